"""gFID / IS / precision / recall: a "generator" that returns the reference images scores gFID ~0 and precision =
recall = 1 (random stand-in features: tests never download Inception); the reference statistics are cached."""

import pytest
import torch

from flowmo.generate.evaluate import GenerationFeatures, evaluate_generator, precision_recall, reference_statistics


def reference_images(manifest, size):
    # Imported here: the data path is the only part of this file that reads image files.
    from flowmo.data.datamodule import resolve_shards
    from flowmo.data.stream import ShardStream

    return torch.stack([row["image"] for row in ShardStream(resolve_shards(str(manifest)), size, train=False)])


def test_generator_returning_the_reference_images_scores_gfid_zero(tmp_path, sample_shards):
    features = GenerationFeatures.stand_in(num_features=8, num_classes=5)
    cache = tmp_path / "reference.pt"
    reference = reference_statistics(sample_shards / "train.json", features, 32, cache=cache, batch_size=16)
    images = reference_images(sample_shards / "train.json", 32)
    assert reference["count"] == len(images) > 8  # more images than features: a full-rank covariance
    served = iter(images.split(16))
    report = evaluate_generator(
        lambda classes: next(served), reference, features, num_samples=len(images), num_classes=4, batch_size=16
    )
    assert report["gfid"] == pytest.approx(0.0, abs=1e-8)
    assert report["precision"] == 1.0 and report["recall"] == 1.0
    assert report["inception_score"] > 1.0 and report["stand_in_features"]
    assert report["reference"]["manifest"].endswith("train.json") and report["reference"]["crop"] == "center"

    served = iter(images.flip(-1).mul(0.5).split(16))  # dimmer, mirrored images are measurably worse
    worse = evaluate_generator(
        lambda classes: next(served), reference, features, num_samples=len(images), num_classes=4, batch_size=16
    )
    # the stand-in's features are small numbers: its distances are too; what matters is the ratio to zero
    assert worse["gfid"] > 1e6 * abs(report["gfid"]) and worse["recall"] < 1.0

    cache_mtime = cache.stat().st_mtime_ns  # a second call reads the cache instead of the shards
    again = reference_statistics(sample_shards / "train.json", features, 32, cache=cache, batch_size=16)
    assert cache.stat().st_mtime_ns == cache_mtime and torch.equal(again["sum"], reference["sum"])


def test_precision_recall_of_disjoint_and_nested_sets():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=generator)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    precision, recall = precision_recall(real, real[:50] * 0.5)  # collapsed onto part of the real manifold
    assert precision > 0.9 and recall < 0.9


def test_inception_generation_features_read_pool3_and_the_classifier_from_one_file(tmp_path):
    """A file with pytorch-fid's key layout (seeded values, as tests/test_metrics_fid.py): IS logits are its fc
    weights (no bias) applied to the same pool3 features gFID uses."""
    from flowmo.pretrained import FILES
    from seeded_weights import deterministic_state_dict, reference_layout

    state = deterministic_state_dict(reference_layout("fid_inception"), seed=0)
    path = tmp_path / FILES["inception_fid"].filename
    torch.save(state, path)
    features = GenerationFeatures.inception(str(path))
    pool, logits = features(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and not features.is_stand_in
    torch.testing.assert_close(logits, pool @ state["fc.weight"].double().T)
