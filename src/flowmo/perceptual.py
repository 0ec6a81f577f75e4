"""Frozen feature networks of the perceptual losses (method §3) and the LPIPS metrics (method §7), built
through the field's own packages.

- ``LPIPSDistance("vgg")`` / ``LPIPSVGG``: the Stage-1A perceptual loss, ``lpips.LPIPS(net="vgg", version="0.1")``
  (the paper's own package: its scaling layer, unit-normalised features and learned linear heads).
- ``LPIPSDistance("alex")``: the second LPIPS variant the evaluation reports.
- ``ResNetLogitsDistance``: the Stage-1B sample loss, MSE between the 1000-d logits of timm's ``resnet50.tv_in1k``
  (torchvision's IMAGENET1K_V1 weights) on both images (MaskBit's "ResNetPerc", logits only), in fp32.
- ``PixelDistance``: the pixel MSE that stands in for the ResNet loss in the CPU demo (needs no weights).

Weights come from flowmo.pretrained: an explicit file or folder, else the usual cache, else a download on first
use (hash checked). ``weights="random"`` is the explicit stand-in for tests and the tiny CPU demo: a random backbone,
logged loudly and flagged by ``.is_stand_in``.

Keeping the nets out of checkpoints: every network here is a ``FrozenNet``. It holds the real network as a
plain attribute (not a registered submodule), so ``state_dict()`` and ``parameters()`` of the owner never
see it: no checkpoint bloat, nothing for an optimizer, DDP or EMA to pick up, no unused-parameter errors.
``FrozenNet`` forwards device/dtype moves (``.to()``, ``.cuda()``, ``.half()``) to the hidden network and
stays in eval mode whatever the owner calls. Gradients still flow to the *input* images, which the losses
need to back-propagate into the decoder.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from flowmo import pretrained
from flowmo.checkpoint import UnsafeWeightsError, load_weights_file
from flowmo.errors import UserError
from flowmo.pretrained import STAND_IN, MissingWeightsError  # noqa: F401 (MissingWeightsError: part of this API)

log = logging.getLogger(__name__)

WeightsArg = str | os.PathLike | None


class StandInWeightsWarning(UserWarning):
    """A frozen feature network runs with random weights: its numbers mean nothing."""


def warn_stand_in(what: str) -> None:
    """Say loudly, in the log and as a warning, that a network runs with random weights."""
    message = (
        f"!!! {what} uses RANDOM weights (weights='random' stand-in): its losses/metrics are NOT comparable "
        f"to the paper. Use this only for tests and the tiny CPU demo. !!!"
    )
    log.warning(message)
    warnings.warn(message, StandInWeightsWarning, stacklevel=3)


def load_state_dict_file(path: os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state dict from ``.pth``/``.pt`` (weights only) or ``.safetensors``."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_weights_file(path)


# ----------------------------------------------------------------------------------------------------------
# The frozen holder


class FrozenNet(nn.Module):
    """Hold ``net`` frozen, in eval mode, outside the module tree (so outside every state_dict).

    Subclasses implement ``forward``. ``self.net`` is a plain attribute: ``state_dict()``,
    ``parameters()`` and ``named_modules()`` of this module and of any owner do not include it.
    """

    def __init__(self, net: nn.Module, *, name: str, is_stand_in: bool) -> None:
        super().__init__()
        net.eval().requires_grad_(False)
        object.__setattr__(self, "net", net)  # bypass nn.Module registration on purpose (module docstring)
        self.name = name
        self.is_stand_in = is_stand_in
        self.train(False)
        if is_stand_in:
            warn_stand_in(name)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() of the owner reach the hidden net through here.
        self.net._apply(fn)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> FrozenNet:
        """Stay in eval mode whatever the owner asks (BatchNorm statistics and dropout stay fixed)."""
        return super().train(False)

    def follow_device(self, x: torch.Tensor) -> None:
        """Move the hidden net to ``x``'s device if a strategy moved only registered tensors (e.g. FSDP)."""
        first = next(self.net.parameters(), None)
        if first is not None and first.device != x.device:
            self.net.to(x.device)

    def extra_repr(self) -> str:
        return f"{self.name}, frozen, outside state_dict, is_stand_in={self.is_stand_in}"


def check_image_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    """Both images [B, 3, H, W] floating point of one shape (values are expected in [-1, 1])."""
    if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
        raise UserError(
            f"Expected two image batches of one shape [B, 3, H, W] in [-1, 1], got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )
    if not (x.is_floating_point() and y.is_floating_point()):
        raise UserError(f"Expected float images in [-1, 1], got dtypes {x.dtype} and {y.dtype}.")


# ----------------------------------------------------------------------------------------------------------
# LPIPS (the lpips package)

LPIPS_BACKBONE_FILES = {"vgg": "vgg16", "alex": "alexnet"}  # flowmo.pretrained keys of the torchvision trunks


def lpips_network(net: str, backbone: os.PathLike | None) -> nn.Module:
    """``lpips.LPIPS`` v0.1 with its learned heads (shipped in the package) and the torchvision trunk read from
    ``backbone`` (None: left random). The package would download the trunk itself through torchvision on every
    new machine; handing it the file keeps one place for downloads, hashes and the offline sentence."""
    import lpips

    with warnings.catch_warnings():  # lpips 0.1.4 still passes torchvision's deprecated `pretrained=` flag
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if backbone is not None:
        model.net.load_state_dict(_lpips_trunk_state(model.net, load_state_dict_file(backbone), backbone))
    return model


def _lpips_trunk_state(trunk: nn.Module, state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """torchvision's ``features.{i}.*`` -> lpips' ``slice{k}.{i}.*`` (lpips keeps torchvision's layer index i).

    Ours, not lpips' own loading: lpips has torchvision read the trunk with torch.hub.load_state_dict_from_url,
    which unpickles with weights_only=False and cannot read an explicit file or folder."""
    mapped = {}
    for key, value in trunk.state_dict().items():
        source = "features." + key.split(".", 1)[1]
        if source not in state or state[source].shape != value.shape:
            raise UserError(f"{path} does not look like the torchvision backbone lpips expects: bad {source}.")
        mapped[key] = state[source]
    return mapped


class LPIPSDistance(FrozenNet):
    """LPIPS v0.1 (``net`` = "vgg" or "alex"); inputs in [-1, 1]; returns the per-sample distance [B].

    weights: None = the torchvision trunk from its cache (downloaded on first use), a file or a folder holding
    it, or "random" (the stand-in: a random trunk under the real heads).
    """

    def __init__(self, net: str = "vgg", weights: WeightsArg = None) -> None:
        if net not in LPIPS_BACKBONE_FILES:
            raise UserError(f"LPIPS net must be one of {sorted(LPIPS_BACKBONE_FILES)}, got {net!r}.")
        path = None if weights == STAND_IN else pretrained.fetch(LPIPS_BACKBONE_FILES[net], weights)
        super().__init__(lpips_network(net, path), name=f"LPIPS-{net}", is_stand_in=path is None)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_pair(x, y)
        self.follow_device(x)
        return self.net(x, y).flatten()


class LPIPSVGG(LPIPSDistance):
    """The Stage 1A perceptual loss network (method §3): LPIPS with VGG16."""

    def __init__(self, weights: WeightsArg = None) -> None:
        super().__init__("vgg", weights)


# ----------------------------------------------------------------------------------------------------------
# ResNet-50 logits (timm)


def resnet50_network(weights: os.PathLike | None) -> nn.Module:
    """timm's ResNet-50 with the IMAGENET1K_V1 weights of ``weights`` (timm's safetensors or torchvision's .pth,
    the same keys), or random (None)."""
    import timm

    if weights is None:
        return timm.create_model("resnet50", pretrained=False)
    try:  # timm reads a .pth with weights_only=True: a pickle that needs more is refused in our sentence
        return timm.create_model("resnet50.tv_in1k", pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    except (pickle.UnpicklingError, RuntimeError) as error:  # timm wraps torch's UnpicklingError in a RuntimeError
        if isinstance(error, pickle.UnpicklingError) or isinstance(error.__cause__, pickle.UnpicklingError):
            raise UnsafeWeightsError(weights) from None
        raise


class ResNetLogitsDistance(FrozenNet):
    """Per-sample MSE between ResNet-50 (IMAGENET1K_V1) logits of two images in [-1, 1] (method §3, Stage 1B).

    Preprocessing follows MaskBit: [-1, 1] -> [0, 1], bilinear resize to 224 with antialias, ImageNet
    mean/std. Returns [B]: the mean over the 1000 logits of the squared difference. The network runs in fp32
    even under bf16 autocast: logit differences of ~0.01 are the signal Stage 1B follows, finer than bf16's
    steps at logits of a few units.
    """

    def __init__(self, weights: WeightsArg = None) -> None:
        import timm

        path = None if weights == STAND_IN else pretrained.fetch("resnet50", weights)
        super().__init__(resnet50_network(path), name="ResNet-50 logits", is_stand_in=path is None)
        data = timm.data.resolve_model_data_config(self.net)  # the network's own input size, mean and std
        self.input_size = tuple(data["input_size"][-2:])
        # Non-persistent buffers: moved with the module, never saved, never rebuilt from Python data in a step.
        self.register_buffer("mean", torch.tensor(data["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data["std"]).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 3, 224, 224] ImageNet-normalised."""
        x = (x + 1) / 2
        x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.follow_device(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.net(self.preprocess(x.to(self.mean.dtype)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_pair(x, y)
        # One pass over both images (eval-mode BatchNorm makes samples independent).
        logits_x, logits_y = self.logits(torch.cat([x, y])).chunk(2)
        return (logits_x - logits_y).pow(2).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Pixel distance: a sample loss that needs no pretrained network


class PixelDistance(FrozenNet):
    """Per-sample mean squared error in pixel space, [B]: the Stage-1B sample loss of the CPU demo.

    Not the paper's loss. Without pretrained ResNet-50 weights a random ResNet gives the 8-step chain a target
    with no meaning; the pixel MSE still makes Stage 1B seek the mode (the input itself), which is what raises
    PSNR. It holds no network and no weights, so it is never a stand-in.
    """

    def __init__(self) -> None:
        super().__init__(nn.Identity(), name="pixel MSE", is_stand_in=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_pair(x, y)
        return (x - y).float().pow(2).flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Factory

PERCEPTUAL_KINDS = ("lpips_vgg", "resnet50_logits", "pixel_mse", "none")


def build_perceptual(kind: str, weights: WeightsArg = None) -> FrozenNet | None:
    """Build the frozen network of a perceptual loss.

    kind: "lpips_vgg" (Stage 1A), "resnet50_logits" (Stage 1B), "pixel_mse" (no network: the CPU demo's
    Stage-1B loss when the ResNet-50 file is absent) or "none" (returns None).
    weights: None = pretrained (cache, else downloaded; MissingWeightsError offline), "random" = explicit
    stand-in (loud warning, ``.is_stand_in``), or a path to the weight file or a folder of them.
    """
    if kind == "lpips_vgg":
        return LPIPSVGG(weights)
    if kind == "resnet50_logits":
        return ResNetLogitsDistance(weights)
    if kind == "pixel_mse":
        return PixelDistance()
    if kind == "none":
        return None
    raise UserError(f"Unknown perceptual network {kind!r}; choose one of {PERCEPTUAL_KINDS}.")
