"""flowmo.feature_nets reproduces torchvision's ResNet-50 and pytorch-fid's FID Inception key for key and output
for output: against a stored fixture of the originals' outputs (runs without torchvision), and against the
originals themselves when they are installed."""

from pathlib import Path
from unittest import mock

import pytest
import torch

from flowmo.feature_nets import deterministic_fill, fid_inception_v3, resnet50

FIXTURE = Path(__file__).parent / "fixtures" / "feature_nets_reference.pt"
RELATIVE_TOLERANCE = 1e-6  # float64 throughout: only summation order differs between implementations


@pytest.fixture(scope="module")
def reference():
    """Made by scripts/make_feature_net_fixtures.py with torchvision and pytorch-fid installed."""
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


def assert_same_layout(model, keys, shapes):
    state = model.state_dict()
    assert list(state) == list(keys)  # same names in the same order
    assert [tuple(value.shape) for value in state.values()] == [tuple(shape) for shape in shapes]


def assert_close_relative(actual, expected):
    """Elementwise, relative to the output's overall scale (a single near-zero entry does not count)."""
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= RELATIVE_TOLERANCE * scale


def filled_in_float64(model, seed):
    return deterministic_fill(model, seed).double().eval()


def test_resnet50_matches_torchvision_fixture(reference):
    _, normalised = fixture_inputs(reference)
    expected = reference["resnet50"]
    model = resnet50()
    assert_same_layout(model, expected["keys"], expected["shapes"])
    with torch.no_grad():
        logits = filled_in_float64(model, reference["fill_seed"])(normalised)
    assert logits.shape == (2, 1000) and logits.dtype == torch.float64
    assert_close_relative(logits, expected["logits"])


def test_fid_inception_matches_pytorch_fid_fixture(reference):
    images01, _ = fixture_inputs(reference)
    expected = reference["fid_inception"]
    model = fid_inception_v3()
    assert_same_layout(model, expected["keys"], expected["shapes"])
    with torch.no_grad():
        pool3 = filled_in_float64(model, reference["fill_seed"])(images01)
    assert pool3.shape == (2, 2048, 1, 1) and pool3.dtype == torch.float64
    assert_close_relative(pool3, expected["pool3"])


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_lpips_package_fixture(reference, net):
    """Our LPIPS (backbone + heads from the lpips wheel's files) gives the package's distances."""
    from flowmo.perceptual import LPIPSDistance, StandInWeightsWarning

    images01, _ = fixture_inputs(reference)
    generator = torch.Generator().manual_seed(reference["input_seed"] + 1)
    others = torch.rand(reference["input_shape"], generator=generator, dtype=torch.float64) * 2 - 1
    with pytest.warns(StandInWeightsWarning):
        lpips = LPIPSDistance(net, weights="random")
    deterministic_fill(lpips.net.features, reference["fill_seed"], prefix="features.")
    with torch.no_grad():
        distances = lpips.double()(images01 * 2 - 1, others)
    assert_close_relative(distances, reference["lpips"][net])


# ----------------------------------------------------------------------------------------------------------
# Against the installed originals (skipped where torchvision / pytorch-fid are absent)


def test_resnet50_against_torchvision():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    original = models.resnet50(weights=None)
    torch.manual_seed(0)
    ours = resnet50()
    # Same random start as torchvision's (the weights='random' stand-in), and its state dict loads strictly.
    for (key, value), (our_key, our_value) in zip(original.state_dict().items(), ours.state_dict().items()):
        assert key == our_key and torch.equal(value, our_value), key
    deterministic_fill(original, seed=7)
    ours.load_state_dict(original.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        assert_close_relative(ours.double().eval()(images), original.double().eval()(images))


def test_fid_inception_against_pytorch_fid():
    pytest.importorskip("torchvision")
    fid_inception = pytest.importorskip("pytorch_fid.inception")
    import torchvision.models

    captured = {}  # pytorch-fid's own randomly initialised Inception3-with-FID-blocks state dict
    with (
        mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: None),
        mock.patch.object(torchvision.models.Inception3, "load_state_dict",
                          lambda model, state, *a, **k: captured.update(model.state_dict())),
    ):
        fid_inception.fid_inception_v3()
    ours = fid_inception_v3()
    ours.load_state_dict(captured, strict=True)
    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: captured):
        original = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
    images01 = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        (expected,) = original.double().eval()(images01)
        assert_close_relative(ours.double().eval()(images01), expected)
