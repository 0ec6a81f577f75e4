"""All reconstruction metrics of the evaluation protocol (method §7) behind one update/compute call.

    metrics = ReconstructionMetrics(lpips_weights="random", fid_feature="random")  # tiny demo stand-ins
    for original, reconstruction in batches:  # [B, 3, H, W] in [-1, 1]; B = 5 reproduces psnr_paper
        metrics.update(reconstruction, original)  # torchmetrics' order: preds, then target
    results = metrics.compute()  # {"psnr": ..., "psnr_paper": ..., "rfid": ..., ...} plain floats
    metrics.stand_ins  # names of networks running with random weights, to record next to the results

Under DDP every process updates with its own shard; ``compute`` gathers the summed states, so every
process gets the values of the whole set. The module's ``state_dict`` is empty: metric states are not
persistent and the frozen networks live outside the module tree (``flowmo.perceptual.FrozenNet``).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from flowmo.metrics.codebook import CodebookUsage
from flowmo.metrics.fid import PairwiseFeatureDistance, RandomConvFeatures, build_fid
from flowmo.metrics.image import PSNR, SSIM, LPIPSMetric, PaperPSNR, PaperSSIM, to_unit_range

RANGE_TOLERANCE = 1e-3
WeightsArg = str | os.PathLike | None


class ReconstructionMetrics(nn.Module):
    """psnr, psnr_paper, ssim, ssim_paper, lpips_<net>, rfid (+ pairwise_features) and codebook usage.

    Each part is optional.

    pixel: compute psnr, psnr_paper, ssim, ssim_paper.
    lpips_nets: LPIPS variants to compute, any of ("alex", "vgg"); () disables LPIPS.
    lpips_weights: None (pretrained: cached, else downloaded), "random" (stand-in) or {net: path}.
    fid_feature: None = the authors' InceptionV3 (``inception_path`` or the cache), "random" = tiny
        random stand-in, an ``nn.Module`` mapping [B, 3, H, W] in [0, 1] to [B, F], or False to skip rFID.
    codebook_bits: G of the LFQ sub-tokens (9 Lo, 14 Hi) to track codebook usage from ``indices``.
    """

    def __init__(
        self,
        *,
        pixel: bool = True,
        lpips_nets: tuple[str, ...] = ("alex", "vgg"),
        lpips_weights: WeightsArg | dict[str, WeightsArg] = None,
        fid_feature: nn.Module | str | bool | None = None,
        inception_path: WeightsArg = None,
        codebook_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.per_image = nn.ModuleDict()
        if pixel:
            self.per_image.update(
                {"psnr": PSNR(), "psnr_paper": PaperPSNR(), "ssim": SSIM(), "ssim_paper": PaperSSIM()}
            )
        for net in lpips_nets:
            self.per_image[f"lpips_{net}"] = LPIPSMetric(net, _weights_for(lpips_weights, net))
        self.fid = _build_optional_fid(fid_feature, inception_path)
        self.pairwise_features = PairwiseFeatureDistance() if self.fid is not None else None
        self.codebook = CodebookUsage(codebook_bits) if codebook_bits is not None else None

    @classmethod
    def for_evaluation(
        cls,
        lpips_nets: tuple[str, ...],
        rfid: bool,
        feature_weights: WeightsArg,
        inception_path: WeightsArg,
        codebook_bits: int | None,
    ) -> "ReconstructionMetrics":
        """The validation / test metrics of a training module: `feature_weights` says where the feature nets' files
        come from (None: the caches; a folder, which then holds the Inception file too; "random": stand-ins);
        `inception_path` names the Inception file itself."""
        fid_feature: str | bool | None = False
        if rfid:
            fid_feature = "random" if feature_weights == "random" else None
        folder = feature_weights not in (None, "random") and Path(feature_weights).is_dir()
        inception = inception_path if inception_path is not None or not folder else feature_weights
        return cls(
            lpips_nets=lpips_nets,
            lpips_weights=feature_weights,
            fid_feature=fid_feature,
            inception_path=inception,
            codebook_bits=codebook_bits,
        )

    @property
    def stand_ins(self) -> list[str]:
        """Names of the networks that run with random stand-in weights (empty for real numbers)."""
        return sorted({m.name for m in self.modules() if getattr(m, "is_stand_in", False) and hasattr(m, "name")})

    def update(self, preds: Tensor, target: Tensor, indices: Tensor | None = None) -> None:
        """preds (the reconstructions), target (the originals): [B, 3, H, W] in [-1, 1], torchmetrics' order;
        indices: [B, N] int64 sub-token indices."""
        original, reconstruction = target, preds
        _check_original_range(original)
        for metric in self.per_image.values():
            metric.update(reconstruction, original)
        if self.fid is not None:
            self._update_fid(original, reconstruction)
        if self.codebook is not None and indices is not None:
            self.codebook.update(indices)

    def _update_fid(self, original: Tensor, reconstruction: Tensor) -> None:
        self.fid.update(to_unit_range(original), real=True)
        original_features = self.fid.inception.last_features
        self.fid.update(to_unit_range(reconstruction), real=False)
        self.pairwise_features.update(original_features, self.fid.inception.last_features)

    def compute(self) -> dict[str, float]:
        results = {name: float(metric.compute()) for name, metric in self.per_image.items()}
        if self.fid is not None:
            results["rfid"] = float(self.fid.compute())
            results["pairwise_features"] = float(self.pairwise_features.compute())
        if self.codebook is not None:
            results.update(_flat_codebook(self.codebook.compute()))
        return results

    def reset(self) -> None:
        for metric in self.per_image.values():
            metric.reset()
        for metric in (self.fid, self.pairwise_features, self.codebook):
            if metric is not None:
                metric.reset()


def _weights_for(weights: WeightsArg | dict[str, WeightsArg], net: str) -> WeightsArg:
    return weights.get(net) if isinstance(weights, dict) else weights


def _build_optional_fid(fid_feature, inception_path):
    if fid_feature is False:
        return None
    if fid_feature == "random":
        fid_feature = RandomConvFeatures()
    if fid_feature is not None and not isinstance(fid_feature, nn.Module):
        raise ValueError(f"fid_feature must be None, 'random', False or an nn.Module, got {fid_feature!r}.")
    return build_fid(fid_feature, inception_path)


def _flat_codebook(usage: dict[str, Tensor]) -> dict[str, float]:
    balance = usage.pop("bit_balance")
    flat = {f"codebook_{name}": float(value) for name, value in usage.items()}
    flat["codebook_bit_balance_min"] = float(balance.min())
    flat["codebook_bit_balance_max"] = float(balance.max())
    return flat


def _check_original_range(original: Tensor) -> None:
    low, high = float(original.min()), float(original.max())  # evaluation only: a host sync is fine
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"Reconstruction metrics expect images in [-1, 1]; the originals span [{low:.3g}, {high:.3g}]. "
            "Map uint8 images with x / 127.5 - 1."
        )
