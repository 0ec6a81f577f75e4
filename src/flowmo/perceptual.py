"""Frozen feature networks for the perceptual losses (spec §3) and the LPIPS metrics (spec §7).

- ``LPIPSVGG``: Stage 1A perceptual loss, LPIPS net='vgg', v0.1, learned linear heads: the ``lpips`` package's
  computation, written here (equal to it, tests/test_feature_nets.py), heads read from its wheel's files.
- ``LPIPSDistance(net='alex')``: the second LPIPS variant the evaluation reports.
- ``ResNetLogitsDistance``: Stage 1B sample loss, MSE between the 1000-d logits of ResNet-50 (torchvision's
  IMAGENET1K_V1 weights, flowmo.feature_nets' network) on both images (MaskBit's "ResNetPerc", logits only).

Weights (DESIGN.md "Conventions"): read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or an
explicit file; never downloaded here. When missing, a ``MissingWeightsError`` names the file, the folder it
is looked for in and the argument that takes a path. ``weights="random"`` is the explicit stand-in for tests
and the tiny CPU demo: a random backbone, logged loudly and flagged by ``.is_stand_in``.

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
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowmo.errors import UserError
from flowmo.feature_nets import alexnet_features, vgg16_features

log = logging.getLogger(__name__)

STAND_IN = "random"

# File names of the torchvision / pytorch-fid releases, as they sit in the torch hub cache.
WEIGHT_FILES = {
    "vgg16": "vgg16-397923af.pth",
    "alexnet": "alexnet-owt-7be5be79.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "inception_fid": "pt_inception-2015-12-05-6726825d.pth",
}
# timm's ``resnet50.tv_in1k`` holds the same IMAGENET1K_V1 weights with the same key names.
RESNET50_HF = ("timm/resnet50.tv_in1k", "model.safetensors")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights for a frozen feature network are not on this machine."""


class StandInWeightsWarning(UserWarning):
    """A frozen feature network runs with random weights: its numbers mean nothing."""


# ----------------------------------------------------------------------------------------------------------
# Finding and loading weight files (no downloads, ever)


def hub_checkpoint_dir() -> Path:
    """Where torchvision / torch.hub keep downloaded weights; follows ``$TORCH_HOME`` at call time."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(key: str, weights: str | os.PathLike | None, *, what: str) -> Path | None:
    """Return the weight file for ``key`` (a WEIGHT_FILES key), or None for the explicit random stand-in.

    ``weights``: None = look in the torch hub cache (and, for ResNet-50, the HF cache of timm);
    "random" = stand-in; anything else = a path to the file, or to a folder holding it under its usual
    name. ``what`` names the network in errors.
    """
    if weights == STAND_IN:
        return None
    filename = WEIGHT_FILES[key]
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():  # a folder of weight files, e.g. a copied hub/checkpoints
            path = path / filename
        if not path.is_file():
            raise MissingWeightsError(f"{what}: weights={str(weights)!r} is not a file (expected {filename}).")
        return path
    for candidate in _cache_candidates(key):
        if candidate.is_file():
            return candidate
    raise MissingWeightsError(
        f"{what}: pretrained weights {filename} not found in {hub_checkpoint_dir()}. Copy the file there "
        f"(or set TORCH_HOME to a folder whose hub/checkpoints/ holds it), or pass its path as weights=PATH; "
        f"only tests and the tiny demo may pass weights='random' (a random stand-in)."
    )


def _cache_candidates(key: str) -> list[Path]:
    candidates = [hub_checkpoint_dir() / WEIGHT_FILES[key]]
    if key == "resnet50":
        hf_file = _hf_cached_file(*RESNET50_HF)
        if hf_file is not None:
            candidates.append(hf_file)
    return candidates


def _hf_cached_file(repo_id: str, filename: str) -> Path | None:
    """A file already in the Hugging Face cache, looked up offline (never a network call)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict from ``.pth``/``.pt`` (weights only) or ``.safetensors``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def warn_stand_in(what: str) -> None:
    """Say loudly, in the log and as a warning, that a network runs with random weights."""
    message = (
        f"!!! {what} uses RANDOM weights (weights='random' stand-in): its losses/metrics are NOT comparable "
        f"to the paper. Use this only for tests and the tiny CPU demo. !!!"
    )
    log.warning(message)
    warnings.warn(message, StandInWeightsWarning, stacklevel=3)


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
# LPIPS
#
# Written here rather than taken from the ``lpips`` package because that package builds its backbones with
# torchvision, and the CPU build of torch our laptop users install has no matching torchvision. The backbones
# (flowmo.feature_nets) keep torchvision's ``features.{i}`` layer indices, so its weight files load unchanged; the
# learned linear heads are read from the files the ``lpips`` wheel ships (the wheel is never imported).

# LPIPS v0.1 input scaling: (x - shift) / scale, per RGB channel, on images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_NORMALIZE_EPS = 1e-10


# Per backbone: the constructor, the ``features`` indices whose output LPIPS compares (after each ReLU named by
# the LPIPS paper: relu1_2 .. relu5_3 for VGG, relu1 .. relu5 for AlexNet) and their channel counts.
LPIPS_BACKBONES = {
    "vgg": (vgg16_features, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
    "alex": (alexnet_features, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
}


class LPIPSNetwork(nn.Module):
    """LPIPS v0.1 (linear heads, no spatial map): per-sample distance [B, 1, 1, 1] of two images in [-1, 1]."""

    def __init__(self, net: str) -> None:
        super().__init__()
        build, taps, channels = LPIPS_BACKBONES[net]
        self.features = build()[: taps[-1] + 1]  # nothing after the last tap is ever used
        self.taps = taps
        # ``lin{k}.model.1.weight`` in the wheel's file: a dropout (inert in eval) then a bias-free 1x1 conv.
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def tapped_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        tapped = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                tapped.append(x)
        return tapped

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # One backbone pass over both images (no batch-dependent layers in it).
        both = self.tapped_features(torch.cat([x, y]))
        distance = 0
        for head, features in zip(self.heads, both):
            fx, fy = _unit_channels(features).chunk(2)
            distance = distance + head((fx - fy).pow(2)).mean(dim=(2, 3), keepdim=True)
        return distance


def _unit_channels(features: torch.Tensor) -> torch.Tensor:
    """Scale every spatial position's channel vector to unit length (LPIPS' normalisation, eps 1e-10)."""
    norm = features.pow(2).sum(dim=1, keepdim=True).sqrt()
    return features / (norm + _NORMALIZE_EPS)


def lpips_heads_file(net: str) -> Path:
    """The linear-head weights of LPIPS v0.1 inside the installed ``lpips`` wheel, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"LPIPS-{net}: the linear heads come from the `lpips` wheel, which is not installed; install it "
            f"without its torchvision requirement: pip install --no-deps lpips."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / f"{net}.pth"
    if not path.is_file():
        raise MissingWeightsError(f"LPIPS-{net}: {path} is missing from the installed lpips wheel; reinstall it.")
    return path


def _load_lpips_heads(network: LPIPSNetwork, path: Path) -> None:
    state = load_state_dict_file(path)
    with torch.no_grad():
        for k, head in enumerate(network.heads):
            key = f"lin{k}.model.1.weight"
            if key not in state or state[key].shape != head.weight.shape:
                raise UserError(f"{path} does not hold LPIPS v0.1 linear heads: bad {key}.")
            head.weight.copy_(state[key])


def _load_lpips_backbone(network: LPIPSNetwork, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy torchvision's ``features.{i}.*`` weights into the backbone, whose layers keep the index i."""
    backbone = {f"features.{key}": value for key, value in network.features.state_dict().items()}
    missing = [key for key in backbone if key not in state or state[key].shape != backbone[key].shape]
    if missing:
        raise UserError(f"{path} does not look like the torchvision backbone: bad {missing[0]}.")
    network.features.load_state_dict({key[len("features."):]: state[key] for key in backbone})


class LPIPSDistance(FrozenNet):
    """LPIPS v0.1 with learned linear heads; inputs in [-1, 1]; returns the per-sample distance [B].

    The linear heads come from the ``lpips`` wheel's files. The backbone (VGG16 / AlexNet, torchvision's
    layout) is filled from the cached torchvision weight file, or left random for the explicit stand-in.
    """

    BACKBONES = {"vgg": "vgg16", "alex": "alexnet"}

    def __init__(self, net: str = "vgg", weights: str | os.PathLike | None = None) -> None:
        if net not in self.BACKBONES:
            raise UserError(f"LPIPS net must be one of {sorted(self.BACKBONES)}, got {net!r}.")
        key = self.BACKBONES[net]
        path = resolve_weights(key, weights, what=f"LPIPS-{net} backbone ({key})")
        model = LPIPSNetwork(net)
        _load_lpips_heads(model, lpips_heads_file(net))
        if path is not None:
            _load_lpips_backbone(model, load_state_dict_file(path), path)
        super().__init__(model, name=f"LPIPS-{net}", is_stand_in=path is None)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_pair(x, y)
        self.follow_device(x)
        return self.net(x, y).flatten()


class LPIPSVGG(LPIPSDistance):
    """The Stage 1A perceptual loss network (spec §3): LPIPS with VGG16."""

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__("vgg", weights)


# ----------------------------------------------------------------------------------------------------------
# ResNet-50 logits


class ResNetLogitsDistance(FrozenNet):
    """Per-sample MSE between ResNet-50 (IMAGENET1K_V1) logits of two images in [-1, 1] (spec §3, Stage 1B).

    Preprocessing follows MaskBit: [-1, 1] -> [0, 1], bilinear resize to 224 with antialias, ImageNet
    mean/std. Returns [B]: the mean over the 1000 logits of the squared difference.
    """

    INPUT_SIZE = 224

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        from flowmo.feature_nets import resnet50

        path = resolve_weights("resnet50", weights, what="ResNet-50 logits distance")
        model = resnet50()  # torchvision's layout, so its weight file loads strictly
        if path is not None:
            model.load_state_dict(load_state_dict_file(path))
        super().__init__(model, name="ResNet-50 logits", is_stand_in=path is None)
        # Non-persistent buffers: moved with the module, never saved.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 3, 224, 224] ImageNet-normalised."""
        x = (x + 1) / 2
        size = (self.INPUT_SIZE, self.INPUT_SIZE)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.follow_device(x)
        return self.net(self.preprocess(x))

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


def build_perceptual(kind: str, weights: str | os.PathLike | None = None) -> FrozenNet | None:
    """Build the frozen network of a perceptual loss.

    kind: "lpips_vgg" (Stage 1A), "resnet50_logits" (Stage 1B), "pixel_mse" (no network: the CPU demo's
    Stage-1B loss when the ResNet-50 file is absent) or "none" (returns None).
    weights: None = pretrained from the cache (MissingWeightsError if absent), "random" = explicit
    stand-in (loud warning, ``.is_stand_in``), or a path to the weight file.
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
