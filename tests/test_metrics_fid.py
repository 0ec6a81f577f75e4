"""rFID: closed-form Fréchet distance, offline Inception policy, loading a file in pytorch-fid's key layout."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from flowmo.metrics import FIDFeatures, InceptionFeatures, build_fid
from flowmo.metrics.fid import fid_inception
from flowmo.pretrained import FILES, MissingWeightsError
from seeded_weights import deterministic_state_dict, reference_layout


class PooledColours(nn.Module):
    """A tiny deterministic feature net: 2x2 average colours plus their squares -> 24 features."""

    def forward(self, images01):
        pooled = nn.functional.adaptive_avg_pool2d(images01, 2).flatten(1)
        return torch.cat([pooled, pooled**2], dim=1)


def frechet_distance_numpy(real, fake):
    """The authors' formula (pytorch-fid): scipy sqrtm on numpy covariances."""
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_fid_equals_closed_form_frechet_distance():
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(60, 3, 16, 16, generator=generator)
    fake = (1 - real) ** 2 * 0.7 + 0.3 * torch.rand(60, 3, 16, 16, generator=generator)
    fid = build_fid(feature=PooledColours())
    for start in range(0, 60, 5):
        fid.update(real[start : start + 5], real=True)
        fid.update(fake[start : start + 5], real=False)
    value = fid.compute()
    assert value.dtype == torch.float64
    net = PooledColours()  # the same float32 features, so the test isolates the distance computation
    expected = frechet_distance_numpy(net(real).double().numpy(), net(fake).double().numpy())
    assert expected > 0.1  # a distance far from zero, so 1e-6 is a real check
    assert float(value) == pytest.approx(expected, abs=1e-6)
    assert fid.state_dict() == {}


def test_injected_features_are_frozen_and_hidden():
    head = nn.Linear(3, 4)
    fid = build_fid(feature=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head))
    assert isinstance(fid.inception, FIDFeatures) and fid.inception.num_features == 4
    assert not head.weight.requires_grad and list(fid.parameters()) == []


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=FILES["inception_fid"].filename):
        build_fid()
    with pytest.raises(MissingWeightsError, match="not a file"):
        build_fid(inception_path=tmp_path / "missing.pth")


def test_inception_features_load_pytorch_fid_weights_from_file(tmp_path):
    """A file in pytorch-fid's key layout, seeded values: it loads strictly into pytorch-fid's network and the
    features are that network's pool3."""
    state = deterministic_state_dict(reference_layout("fid_inception"), seed=0)
    path = tmp_path / FILES["inception_fid"].filename
    torch.save(state, path)

    features = InceptionFeatures(weights=path)
    assert not features.is_stand_in and features.state_dict() == {}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = features(images)
    assert out.shape == (2, 2048) and out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(features.net.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    with torch.no_grad():  # preprocessing (resize to 299, 2x - 1) is the network's own
        expected = fid_inception(state).eval()(images)[0].flatten(1).double()
    torch.testing.assert_close(out, expected)


def test_pairwise_feature_distance_in_reconstruction_metrics():
    from flowmo.metrics import ReconstructionMetrics

    generator = torch.Generator().manual_seed(1)
    original = torch.rand(6, 3, 16, 16, generator=generator) * 2 - 1
    reconstruction = (original + 0.3 * torch.randn(original.shape, generator=generator)).clamp(-1, 1)
    metrics = ReconstructionMetrics(pixel=False, lpips_nets=(), fid_feature=PooledColours())
    metrics.update(reconstruction[:3], original[:3])
    metrics.update(reconstruction[3:], original[3:])
    results = metrics.compute()
    net = PooledColours()
    pair_distances = (net((original + 1) / 2) - net((reconstruction + 1) / 2)).double().pow(2).sum(dim=1)
    assert results["pairwise_features"] == pytest.approx(float(pair_distances.mean()), rel=1e-9)
    assert set(results) == {"rfid", "pairwise_features"}


def test_a_pytorch_fid_that_stops_asking_its_loader_is_an_error_not_a_silent_download(monkeypatch):
    import torchvision
    from pytorch_fid import inception

    # a release that builds its network without asking the loader flowmo hands the weights through
    monkeypatch.setattr(
        inception,
        "fid_inception_v3",
        lambda: torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False),
    )
    with pytest.raises(RuntimeError, match="no longer works with this pytorch-fid"):
        fid_inception({})
