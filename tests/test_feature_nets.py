"""The feature networks flowmo builds through the field's packages (lpips.LPIPS, timm's ResNet-50, pytorch-fid's
InceptionV3) give the stored reference outputs: the same numbers as the hand-written copies they replaced, on
identical seeded weights (tests/fixtures/feature_nets_reference.pt, made by scripts/make_feature_net_fixtures.py)."""

from pathlib import Path

import pytest
import torch

from flowmo.metrics.fid import InceptionFeatures
from flowmo.perceptual import LPIPSDistance, ResNetLogitsDistance, StandInWeightsWarning
from seeded_weights import deterministic_fill, deterministic_state_dict, reference_layout

FIXTURE = Path(__file__).parent / "fixtures" / "feature_nets_reference.pt"
RELATIVE_TOLERANCE = 1e-6  # float64 throughout: only summation order differs between implementations


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def fixture_inputs(reference):
    """The script's inputs, regenerated from its seed: (images in [0, 1], standard-normal images), float64."""
    generator = torch.Generator().manual_seed(reference["input_seed"])
    shape = reference["input_shape"]
    images01 = torch.rand(shape, generator=generator, dtype=torch.float64)
    normalised = torch.randn(shape, generator=generator, dtype=torch.float64)
    checksums = reference["input_checksums"]
    assert float(images01.sum()) == pytest.approx(checksums["images01"], rel=1e-12)
    assert float(normalised.sum()) == pytest.approx(checksums["normalised"], rel=1e-12)
    return images01, normalised


def assert_close_relative(actual, expected):
    """Elementwise, relative to the output's overall scale (a single near-zero entry does not count)."""
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= RELATIVE_TOLERANCE * scale


def test_timm_resnet50_gives_the_reference_logits(reference, tmp_path):
    """Loaded through the same path as the real weights: a torchvision-layout .pth file handed to timm."""
    _, normalised = fixture_inputs(reference)
    expected = reference["resnet50"]
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(deterministic_state_dict(reference_layout("resnet50"), reference["fill_seed"]), path)
    distance = ResNetLogitsDistance(weights=path)
    assert not distance.is_stand_in
    assert sorted(distance.net.state_dict()) == sorted(expected["keys"])  # timm keeps torchvision's names
    with torch.no_grad():
        logits = distance.net.double()(normalised)
    assert logits.shape == (2, 1000) and logits.dtype == torch.float64
    assert_close_relative(logits, expected["logits"])


def test_pytorch_fid_inception_gives_the_reference_pool3(reference, tmp_path):
    images01, _ = fixture_inputs(reference)
    expected = reference["fid_inception"]
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(deterministic_state_dict(reference_layout("fid_inception"), reference["fill_seed"]), path)
    features = InceptionFeatures(weights=path)
    with torch.no_grad():
        (pool3,) = features.net.double()(images01)
    assert pool3.shape == (2, 2048, 1, 1) and pool3.dtype == torch.float64
    assert_close_relative(pool3, expected["pool3"])


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_package_gives_the_reference_distances(reference, net, tmp_path):
    """lpips.LPIPS with its own heads and a torchvision-layout trunk file of seeded weights."""
    images01, _ = fixture_inputs(reference)
    generator = torch.Generator().manual_seed(reference["input_seed"] + 1)
    others = torch.rand(reference["input_shape"], generator=generator, dtype=torch.float64) * 2 - 1
    with pytest.warns(StandInWeightsWarning):
        trunk = LPIPSDistance(net, weights="random").net.net  # only for its layout: lpips' slice{k}.{i}.*
    layout = {"features." + key.split(".", 1)[1]: value for key, value in trunk.state_dict().items()}
    path = tmp_path / f"{net}.pth"
    torch.save(deterministic_state_dict(layout, reference["fill_seed"]), path)
    lpips = LPIPSDistance(net, weights=path)
    assert not lpips.is_stand_in
    with torch.no_grad():
        distances = lpips.double()(images01 * 2 - 1, others)
    assert_close_relative(distances, reference["lpips"][net])


def test_seeded_fill_is_a_function_of_names_and_shapes():
    a = deterministic_fill(torch.nn.Linear(3, 2), seed=5)
    b = deterministic_fill(torch.nn.Linear(3, 2), seed=5)
    assert torch.equal(a.weight, b.weight) and not torch.equal(
        a.weight, deterministic_fill(torch.nn.Linear(3, 2), 6).weight
    )
