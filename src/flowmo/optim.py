"""State that lives beside the optimizer: the EMA of the weights and the weight-norm projection (spec 5).

Both are nn.Modules owned by FlowMoModule, so their tensors are in every checkpoint and a resumed run
continues exactly (the authors' code restarts the EMA from the raw weights on resume; we do not).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from flowmo.training_stats import global_norm


class ModelEMA(nn.Module):
    """EMA of a model's full state dict, updated every `every` optimizer steps with decay**every.

    decay 0.9999 every 10 steps gives 0.9999**10 ~ 0.9990 per update (spec 5): the same horizon as a
    per-step EMA at a tenth of the cost.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, every: int = 10):
        super().__init__()
        if not 0 < decay < 1 or every < 1:
            raise ValueError(f"EMA needs 0 < decay < 1 and every >= 1, got decay={decay}, every={every}.")
        self.decay, self.every = decay, every
        self.module = copy.deepcopy(model).requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        ema_state, state = self.module.state_dict(), model.state_dict()
        names = [k for k, v in ema_state.items() if v.is_floating_point()]
        return [ema_state[k] for k in names], [state[k].detach() for k in names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- d^every ema + (1 - d^every) w, for every floating-point tensor of the state dict."""
        ema, current = self._pairs(model)
        torch._foreach_lerp_(ema, current, 1.0 - self.decay**self.every)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        ema, current = self._pairs(model)
        torch._foreach_copy_(ema, current)

    @torch.no_grad()
    def relative_distance(self, model: nn.Module) -> Tensor:
        """||ema - w|| / ||w|| over all floating-point tensors (a logged health signal)."""
        ema, current = self._pairs(model)
        return global_norm(torch._foreach_sub(ema, current)) / global_norm(current).clamp_min(1e-12)


FUSED_ADAM_DEVICES = ("cuda", "cpu", "xpu", "mps")


def adam_kernel(device: torch.device) -> dict[str, bool]:
    """Adam's one-kernel implementation wherever torch has it. On CPU torch otherwise picks its per-tensor loop:
    536 ms per step for cpu-mid's 26M parameters against 17 ms fused (a third of a whole 1A step), and the
    weights after 20 steps agree to 1.5e-8 (tests/test_speed.py)."""
    if device.type in FUSED_ADAM_DEVICES:
        return {"fused": True}
    return {"foreach": True}


def block_linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear inside a double block (qkv, proj, both MLP layers, modulation), spec 5."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".double_blocks." in f".{name}"]


class WeightNormProjection(nn.Module):
    """After each optimizer step, rescale each block Linear weight back to its initial Frobenius norm
    (EDM2-style "fix_initial_norms", per matrix, spec 8.15). The target norms are a checkpointed buffer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = block_linear_names(model)
        with torch.no_grad():
            norms = [model.get_submodule(n).weight.detach().float().norm() for n in self.names]
        self.register_buffer("target_norms", torch.stack(norms) if norms else torch.zeros(0))
        self._weights: list[nn.Parameter] | None = None  # resolved on first use, not on every step

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        """Project the trainable weights (frozen ones have not moved, so they are skipped)."""
        if self._weights is None:
            self._weights = [model.get_submodule(name).weight for name in self.names]
        trainable = [(w, self.target_norms[i]) for i, w in enumerate(self._weights) if w.requires_grad]
        weights, targets = [w for w, _ in trainable], [t for _, t in trainable]
        if not weights:
            return
        norms = torch._foreach_norm(weights)  # master weights are fp32 (spec 8.21)
        scales = torch._foreach_div(targets, torch._foreach_clamp_min(norms, 1e-12))
        torch._foreach_mul_(weights, scales)
