"""rFID (method §7): torchmetrics' FrechetInceptionDistance between originals and reconstructions.

The authors use pytorch-fid's InceptionV3 (TF-ported ``pt_inception-2015-12-05`` weights, pool3 2048-d) on
**float** images in [0, 1], bilinearly resized to 299 without antialias: that is the network here
(``pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True)``). torchmetrics' built-in
extractor would quantise to uint8 and resize TF-style, so we always hand torchmetrics a feature module
(``feature=<nn.Module>``): ``InceptionFeatures`` for real numbers, any ``nn.Module`` mapping [B, 3, H, W] in
[0, 1] to [B, F] features for tests, and ``RandomConvFeatures`` as the loud stand-in of the tiny demo.

Features are handed over in float64: torchmetrics accumulates in float64 but casts the final FID to the
dtype of the features, and we want the float64 value.
"""

from __future__ import annotations

import os
from unittest import mock

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance

from flowmo import pretrained
from flowmo.perceptual import FrozenNet, load_state_dict_file

INCEPTION_DIM = 2048


class FIDFeatures(FrozenNet):
    """Frozen feature extractor for FID: [B, 3, H, W] in [0, 1] -> [B, F] float64, without gradients.

    Wraps any ``nn.Module`` (kept out of state_dict like every FrozenNet); ``num_features`` tells
    torchmetrics the feature size without a dummy forward pass.
    """

    def __init__(self, net: nn.Module, num_features: int, *, name: str, is_stand_in: bool = False) -> None:
        super().__init__(net, name=name, is_stand_in=is_stand_in)
        self.num_features = num_features
        self.last_features: Tensor | None = None  # read by the pairwise distance: no second network pass

    def extract(self, images01: Tensor) -> Tensor:
        return self.net(images01)

    def forward(self, images01: Tensor) -> Tensor:
        if images01.dim() != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ValueError(f"FID expects float images [B, 3, H, W] in [0, 1], got {tuple(images01.shape)}.")
        self.follow_device(images01)
        # Features in float32 even when the evaluation loop runs under bf16 autocast.
        with torch.no_grad(), torch.autocast(images01.device.type, enabled=False):
            self.last_features = self.extract(images01.float()).flatten(1).double()
        return self.last_features


class InceptionFeatures(FIDFeatures):
    """FID InceptionV3 pool3 features (2048-d): the authors' rFID network (pytorch-fid's) and preprocessing.

    ``weights``: None = ``pt_inception-2015-12-05-6726825d.pth`` from the torch hub cache (downloaded on first
    use), or a path to that file or a folder holding it. There is no random stand-in: use ``RandomConvFeatures``.
    ``path`` is the file the network was read from (its ``fc`` weight gives the Inception Score logits).
    """

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        if weights == pretrained.STAND_IN:
            raise ValueError("InceptionFeatures has no random stand-in; use RandomConvFeatures for the tiny demo.")
        self.path = pretrained.fetch("inception_fid", weights)
        super().__init__(fid_inception(load_state_dict_file(self.path)), INCEPTION_DIM, name="FID-InceptionV3")

    def extract(self, images01: Tensor) -> Tensor:
        # pytorch-fid resizes (bilinear to 299, align_corners=False, no antialias) and maps to [-1, 1] itself.
        (pool3,) = self.net(images01)  # [B, 2048, 1, 1]
        return pool3


def fid_inception(state: dict[str, Tensor]) -> nn.Module:
    """pytorch-fid's InceptionV3 (pool3 only) holding ``state`` (the layout of pytorch-fid's weight file).

    pytorch-fid always asks its release address for the weights; it is handed the file flowmo.pretrained
    fetched and checked (or the user's own), so there is one place for downloads and the offline sentence."""
    from pytorch_fid import inception

    asked = []

    def hand_over(url, *args, **kwargs):
        asked.append(url)
        return state

    # InceptionV3 takes no weights argument, so its loader is replaced for the call; a release that stops asking it
    # is an error here (patch.object also refuses a renamed loader), never a silent download of other weights
    with mock.patch.object(inception, "load_state_dict_from_url", hand_over):
        net = inception.InceptionV3(
            [inception.InceptionV3.DEFAULT_BLOCK_INDEX], resize_input=True, normalize_input=True
        )
    if asked != [inception.FID_WEIGHTS_URL]:
        raise RuntimeError(
            f"pytorch-fid's InceptionV3 asked its loader {asked} instead of once for "
            "FID_WEIGHTS_URL: flowmo's hand-off of the weights no longer works with this pytorch-fid."
        )
    return net


class RandomConvFeatures(FIDFeatures):
    """A tiny random conv net as FID features: the explicit, loud stand-in for tests and the CPU demo."""

    def __init__(self, num_features: int = 64, seed: int = 0) -> None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # same stand-in on every process and every run
        net = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, num_features, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
        )
        torch.random.set_rng_state(generator_state)
        super().__init__(net, num_features, name="rFID random-conv features", is_stand_in=True)


class PairwiseFeatureDistance(Metric):
    """Squared Euclidean distance between the features of each (original, reconstruction) pair, averaged
    over pairs: the authors' "pairwise inception" (method §7)."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("distance_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_pairs", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, original_features: Tensor, reconstruction_features: Tensor) -> None:
        """Both [B, F]."""
        difference = original_features.double() - reconstruction_features.double()
        self.distance_sum += difference.pow(2).sum()
        self.num_pairs += difference.shape[0]

    def compute(self) -> Tensor:
        return self.distance_sum / self.num_pairs


def build_fid(
    feature: nn.Module | None = None, inception_path: str | os.PathLike | None = None, num_features: int | None = None
) -> FrechetInceptionDistance:
    """FrechetInceptionDistance on [0, 1] float images (``normalize=True``), real = originals.

    feature: None = the authors' InceptionV3 (``inception_path``, else cached or downloaded); an
    ``FIDFeatures`` as is; any other ``nn.Module`` mapping [B, 3, H, W] in [0, 1] to [B, F] is wrapped
    (pass ``num_features`` or it is found with one dummy image).
    """
    if feature is None:
        feature = InceptionFeatures(inception_path)
    elif not isinstance(feature, FIDFeatures):
        size = num_features if num_features is not None else _feature_size(feature)
        feature = FIDFeatures(feature, size, name=f"FID features ({type(feature).__name__})")
    return FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=True)


def _feature_size(net: nn.Module) -> int:
    with torch.no_grad():
        return net(torch.rand(1, 3, 64, 64)).flatten(1).shape[1]
