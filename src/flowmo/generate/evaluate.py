"""gFID / IS / precision / recall of a generator, against reference statistics cached once from image shards.

Protocol (the generation literature mixes several; method §7): N class-balanced samples (class i % C) are
compared with the *training shards'* center crops at the tokenizer's resolution (`flowmo shards` manifest), both
as float images in [0, 1] through pytorch-fid's InceptionV3 (the rFID network and preprocessing of method §7:
bilinear resize to 299, no uint8 quantisation).
- gFID: torchmetrics FrechetInceptionDistance on pool3 features; the reference side is loaded from the cache.
- IS: torchmetrics InceptionScore (10 splits) on the Inception classifier's logits without bias, read from the
  same weight file (the "logits_unbiased" of torch-fidelity).
- Precision / recall: the k-NN manifold estimate (Kynkaenniemi et al. 2019, k = 3) on the same pool3 features,
  with at most `max_knn` reference features (the first ones in shard order).
This is not ADM's evaluator and reference batch, so numbers are comparable to papers that used training-set
statistics of the same network, not to every row of the paper's Table 2 (whose protocol the method page does not state).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from flowmo.data.datamodule import resolve_shards
from flowmo.data.stream import ShardStream, collate
from flowmo.metrics.fid import InceptionFeatures, RandomConvFeatures
from flowmo.perceptual import load_state_dict_file

PROTOCOL = (
    "class-balanced samples vs. training-shard center crops; pytorch-fid InceptionV3 pool3 on float [0,1] "
    "images (bilinear 299); IS on unbiased logits, 10 splits; precision/recall k-NN k=3"
)


class GenerationFeatures(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> (pool features [B, D] float64, class logits [B, C] float64)."""

    def __init__(self, features: nn.Module, head: Tensor, name: str, is_stand_in: bool):
        super().__init__()
        self.features, self.name, self.is_stand_in = features, name, is_stand_in
        self.register_buffer("head", head.double())

    def forward(self, images01: Tensor) -> tuple[Tensor, Tensor]:
        pool = self.features(images01).flatten(1).double()
        return pool, pool @ self.head.T

    @classmethod
    def inception(cls, weights: str | None = None) -> "GenerationFeatures":
        """The real network: pool3 features of pt_inception-2015-12-05 and the classifier weight of the same file
        (pytorch-fid's network keeps no classifier; the file holds it as ``fc.weight``)."""
        inception = InceptionFeatures(weights)
        head = load_state_dict_file(inception.path)["fc.weight"]
        # The name keys the reference-statistics cache: it names the network, so caches written before stay valid.
        return cls(inception, head, "InceptionV3 (pytorch-fid)", is_stand_in=False)

    @classmethod
    def stand_in(cls, num_features: int = 64, num_classes: int = 10, seed: int = 0) -> "GenerationFeatures":
        """A random conv net and random class head: for tests and CPU plumbing only (its numbers mean nothing)."""
        head = torch.randn(num_classes, num_features, generator=torch.Generator().manual_seed(seed))
        return cls(RandomConvFeatures(num_features, seed), head, "random-conv stand-in", is_stand_in=True)


class Precomputed(nn.Module):
    """Hands already-extracted features to a torchmetrics metric (the network runs once per image, not twice)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def reference_statistics(
    manifest: str | Path,
    features: GenerationFeatures,
    image_size: int,
    cache: str | Path | None = None,
    batch_size: int = 50,
    max_images: int | None = None,
    max_knn: int = 10_000,
) -> dict:
    """Mean/covariance sums and the first `max_knn` features of the reference images, from `cache` when it holds
    the same reference (manifest, size, network, count); otherwise computed and written there."""

    reference = {
        "manifest": str(Path(manifest).resolve()),
        "crop": "center",
        "image_size": image_size,
        "features": features.name,
        "stand_in": features.is_stand_in,
        "max_images": max_images,
    }
    if cache is not None and Path(cache).is_file():
        cached = torch.load(cache, map_location="cpu", weights_only=True)
        if {key: value for key, value in cached["reference"].items() if key != "num_images"} == reference:
            return cached
    stream = ShardStream(resolve_shards(str(manifest)), image_size, train=False, max_samples=max_images)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate)
    total, outer, count, kept = None, None, 0, []
    for batch in loader:
        pool, _ = features((batch["image"].to(features.head.device) + 1) / 2)
        pool = pool.cpu()
        total = pool.sum(0) if total is None else total + pool.sum(0)
        outer = pool.T @ pool if outer is None else outer + pool.T @ pool
        count += pool.shape[0]
        kept.append(pool[: max(0, max_knn - sum(k.shape[0] for k in kept))].float())
    if count == 0:
        raise ValueError(f"{manifest} yielded no readable reference image; check the shards.")
    stats = {
        "reference": {**reference, "num_images": count},
        "sum": total,
        "outer_sum": outer,
        "count": count,
        "knn_features": torch.cat(kept),
    }
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save(stats, cache)
    return stats


def knn_radii(features: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance of each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = [
        torch.cdist(features[start : start + chunk], features).kthvalue(k + 1, dim=1).values
        for start in range(0, len(features), chunk)
    ]
    return torch.cat(radii)


def fraction_inside(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1024) -> float:
    """The fraction of `points` inside at least one ball (centre, radius): the k-NN manifold estimate."""
    inside = [
        (torch.cdist(points[start : start + chunk], centres) <= radii).any(dim=1)
        for start in range(0, len(points), chunk)
    ]
    return torch.cat(inside).float().mean().item()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: generated samples inside the real manifold; recall: real samples inside the generated one."""
    real, fake = real.float(), fake.float()
    return (fraction_inside(fake, real, knn_radii(real, k)), fraction_inside(real, fake, knn_radii(fake, k)))


def sample_features(
    sample_fn: Callable[[Tensor], Tensor], labels: Tensor, features: GenerationFeatures, batch_size: int = 50
) -> tuple[Tensor, Tensor]:
    """(pool features [N, D], logits [N, C]) on the CPU, float32 (the network's own precision), of the images
    `sample_fn(classes [B]) -> [B, 3, H, W] in [-1, 1]` makes for `labels` [N]."""
    pools, logits = [], []
    for start in range(0, len(labels), batch_size):
        images = sample_fn(labels[start : start + batch_size])
        pool, logit = features(((images.float().to(features.head.device) + 1) / 2).clamp(0, 1))
        pools.append(pool.float().cpu())
        logits.append(logit.float().cpu())
    return torch.cat(pools), torch.cat(logits)


def metrics_from_features(
    reference: dict, pool: Tensor, logits: Tensor, features: GenerationFeatures, k: int = 3, chunk: int = 1000
) -> dict:
    """gFID, IS, precision and recall of generated features against `reference` (reference_statistics), with
    the protocol and the reference set named."""
    fid = FrechetInceptionDistance(feature=Precomputed(reference["sum"].numel()), reset_real_features=False)
    fid.real_features_sum = reference["sum"].double().cpu().clone()
    fid.real_features_cov_sum = reference["outer_sum"].double().cpu().clone()
    fid.real_features_num_samples = torch.tensor(reference["count"]).long()
    inception_score = InceptionScore(feature=Precomputed(logits.shape[1]), splits=10)
    for start in range(0, len(pool), chunk):
        fid.update(pool[start : start + chunk].double(), real=False)
        inception_score.update(logits[start : start + chunk].double())
    score_mean, score_std = inception_score.compute()
    knn_reference = reference["knn_features"]
    precision, recall = precision_recall(knn_reference, pool[: len(knn_reference)], k)
    return {
        "gfid": float(fid.compute()),
        "inception_score": float(score_mean),
        "inception_score_std": float(score_std),
        "precision": precision,
        "recall": recall,
        "num_samples": len(pool),
        "knn_k": k,
        "reference": reference["reference"],
        "protocol": PROTOCOL,
        "features": features.name,
        "stand_in_features": features.is_stand_in,
    }


def evaluate_generator(
    sample_fn: Callable[[Tensor], Tensor],
    reference: dict,
    features: GenerationFeatures,
    num_samples: int,
    num_classes: int,
    batch_size: int = 50,
    k: int = 3,
) -> dict:
    """Metrics of `sample_fn` over `num_samples` class-balanced samples (class i % num_classes) on one device."""
    labels = torch.arange(num_samples) % num_classes
    return metrics_from_features(reference, *sample_features(sample_fn, labels, features, batch_size), features, k)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
