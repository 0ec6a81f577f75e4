"""Seeded weights that depend only on a state dict's key names and shapes: two implementations of one network
(a library's, and the one the stored reference outputs came from) get identical values.

Used by tests/test_feature_nets.py and scripts/make_feature_net_fixtures.py (which made
tests/fixtures/feature_nets_reference.pt with them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


def deterministic_state_dict(layout: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Seeded float32 values for every entry of ``layout`` (a state dict), drawn in sorted key order.

    Running variances are positive and BatchNorm scales near 1, so deep nets stay numerically tame; integer
    buffers (``num_batches_tracked``) are zero.
    """
    generator = torch.Generator().manual_seed(seed)
    filled = {key: _seeded_value(key, layout[key], generator) for key in sorted(layout)}
    return {key: filled[key] for key in layout}


def deterministic_fill(module: nn.Module, seed: int, prefix: str = "") -> nn.Module:
    """Load ``deterministic_state_dict`` of the module's own layout into it (strictly); returns the module.

    ``prefix`` names the keys as they sit in a bigger network, so the values equal those the bigger layout gets.
    """
    layout = {prefix + key: value for key, value in module.state_dict().items()}
    state = deterministic_state_dict(layout, seed)
    module.load_state_dict({key[len(prefix) :]: value for key, value in state.items()}, strict=True)
    return module


def _seeded_value(key: str, like: Tensor, generator: torch.Generator) -> Tensor:
    if not like.is_floating_point():
        return torch.zeros_like(like)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(like.shape, generator=generator)

    def normal(std: float) -> Tensor:
        return std * torch.randn(like.shape, generator=generator)

    name = key.rsplit(".", 1)[-1]
    if name == "running_var":
        return uniform(0.5, 1.5)
    if name == "running_mean" or name == "bias":
        return normal(0.1)
    if like.dim() == 1:  # a BatchNorm scale
        return uniform(0.5, 1.5)
    # Conv / linear weight at He scale: the signal neither dies nor explodes through the ReLUs, so the
    # outputs depend on the input (at 1/fan_in, Inception's pool3 barely moves with the image).
    fan_in = like[0].numel()
    return normal(math.sqrt(2 / fan_in))


REFERENCE = Path(__file__).parent / "fixtures" / "feature_nets_reference.pt"


def reference_layout(network: str) -> dict[str, Tensor]:
    """Zeros in the key layout of a network of the stored reference ("resnet50": torchvision's; "fid_inception":
    pytorch-fid's weight file), to fill with ``deterministic_state_dict`` without building the network."""
    stored = torch.load(REFERENCE, map_location="cpu", weights_only=True)[network]
    return {
        key: torch.zeros(shape, dtype=torch.long if key.endswith("num_batches_tracked") else torch.float32)
        for key, shape in zip(stored["keys"], stored["shapes"])
    }
