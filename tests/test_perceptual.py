"""Frozen perceptual networks: offline weight policy, stand-ins, freezing, gradients, preprocessing."""

import socket
import urllib.request

import pytest
import torch
from torch import nn

from flowmo.perceptual import (
    LPIPSVGG,
    LPIPSDistance,
    MissingWeightsError,
    ResNetLogitsDistance,
    StandInWeightsWarning,
    build_perceptual,
)
from flowmo.pretrained import FILES
from seeded_weights import deterministic_state_dict, reference_layout


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def lpips_vgg():
    with pytest.warns(StandInWeightsWarning):
        return build_perceptual("lpips_vgg", weights="random")


@pytest.fixture(scope="module")
def resnet():
    with pytest.warns(StandInWeightsWarning):
        return build_perceptual("resnet50_logits", weights="random")


def images(batch=2, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: build_perceptual("lpips_vgg"), "vgg16"),
        (lambda: LPIPSDistance("alex"), "alexnet"),
        (lambda: build_perceptual("resnet50_logits"), "resnet50"),
    ],
)
def test_missing_weights_offline_names_file_address_and_cache(make, key, empty_caches, no_network):
    """HF_HUB_OFFLINE=1 (tests/conftest.py): nothing is downloaded, one sentence says what, where from, where to."""
    with pytest.raises(MissingWeightsError) as error:
        make()
    message, spec = str(error.value), FILES[key]
    assert spec.filename in message and spec.address in message and str(spec.cache_folder()) in message
    assert str(spec.cache_folder()).startswith(str(empty_caches.parents[2]))  # the test's own empty caches
    assert "HF_HUB_OFFLINE" in message and "flowmo fetch-weights" in message and "\n" not in message


def test_explicit_folder_is_searched_for_the_usual_name(tmp_path):
    with pytest.raises(MissingWeightsError, match=FILES["resnet50"].filename):
        build_perceptual("resnet50_logits", weights=tmp_path)


def test_explicit_path_that_does_not_exist(tmp_path):
    with pytest.raises(MissingWeightsError, match="not a file"):
        build_perceptual("resnet50_logits", weights=tmp_path / "nope.pth")


def test_factory_none_and_unknown():
    assert build_perceptual("none") is None
    with pytest.raises(ValueError, match="lpips_vgg"):
        build_perceptual("vgg_features")


def test_pixel_mse_needs_no_weights_and_measures_per_sample(no_network):
    net = build_perceptual("pixel_mse")
    assert not net.is_stand_in and not list(net.state_dict())
    x = torch.zeros(2, 3, 8, 8, requires_grad=True)
    y = torch.stack([torch.zeros(3, 8, 8), torch.full((3, 8, 8), 0.5)])
    distance = net(x, y)
    assert distance.tolist() == [0.0, 0.25]
    distance.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the chain sample gets a gradient


def test_stand_in_is_flagged_and_builds_offline(no_network):
    with pytest.warns(StandInWeightsWarning, match="RANDOM"):
        net = LPIPSDistance("alex", weights="random")
    assert net.is_stand_in


def alexnet_trunk_file_state(seed=0) -> dict:
    """A torchvision-layout AlexNet file: ``features.{i}.*`` of lpips' trunk plus a classifier LPIPS never reads."""
    with pytest.warns(StandInWeightsWarning):
        trunk = LPIPSDistance("alex", weights="random").net.net
    layout = {"features." + key.split(".", 1)[1]: value for key, value in trunk.state_dict().items()}
    return {**deterministic_state_dict(layout, seed), "classifier.1.weight": torch.zeros(4096, 9216)}


def test_lpips_backbone_loaded_from_torch_hub_cache(empty_caches, no_network):
    reference = alexnet_trunk_file_state()
    empty_caches.mkdir(parents=True)
    torch.save(reference, empty_caches / FILES["alexnet"].filename)
    net = LPIPSDistance("alex")
    assert not net.is_stand_in
    torch.testing.assert_close(net.net.net.slice1[0].weight, reference["features.0.weight"])
    torch.testing.assert_close(getattr(net.net.net.slice5, "10").weight, reference["features.10.weight"])


def test_lpips_backbone_file_with_wrong_layout_is_refused(empty_caches, no_network):
    empty_caches.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, empty_caches / FILES["alexnet"].filename)
    with pytest.raises(ValueError, match="does not look like the torchvision backbone"):
        LPIPSDistance("alex")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])  # torchvision's file or timm's resnet50.tv_in1k
def test_resnet_loaded_from_explicit_path(suffix, tmp_path, no_network):
    from safetensors.torch import save_file

    reference = deterministic_state_dict(reference_layout("resnet50"), seed=0)  # torchvision's key layout
    path = tmp_path / f"my_resnet{suffix}"
    if suffix == ".safetensors":
        save_file(reference, path)
    else:
        torch.save(reference, path)
    net = ResNetLogitsDistance(weights=path)
    assert not net.is_stand_in
    torch.testing.assert_close(net.net.fc.weight, reference["fc.weight"])
    torch.testing.assert_close(net.net.layer4[2].bn3.running_var, reference["layer4.2.bn3.running_var"])


def test_resnet_logits_stay_fp32_under_bf16_autocast(resnet):
    """Stage 1B follows logit differences of ~0.01: under bf16 autocast the ResNet still runs in fp32."""
    x, y = images(1, seed=7), images(1, seed=8)
    with torch.no_grad():
        plain = resnet(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, autocast = resnet.logits(x), resnet(x.bfloat16(), y.bfloat16())
    assert logits.dtype == torch.float32 and autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=2e-2, atol=0)  # only the inputs' rounding to bf16 differs


@pytest.mark.parametrize("name", ["lpips_vgg", "resnet"])
def test_frozen_eval_outside_state_dict_and_grads_reach_input(name, request):
    perceptual = request.getfixturevalue(name)
    owner = nn.ModuleDict({"head": nn.Linear(2, 2), "perceptual": perceptual})
    owner.train()
    assert not perceptual.training and not perceptual.net.training
    assert all(not m.training for m in perceptual.net.modules())
    assert set(owner.state_dict()) == {"head.weight", "head.bias"}
    assert len(list(owner.parameters())) == 2
    assert all(not p.requires_grad for p in perceptual.net.parameters())

    batch = 2 if name == "lpips_vgg" else 1  # ResNet-50 at 224 px is slow on CPU
    x, y = images(batch, seed=1).requires_grad_(True), images(batch, seed=2)
    distance = perceptual(x, y)
    assert distance.shape == (batch,)
    distance.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.net.parameters())


def test_owner_dtype_move_reaches_hidden_net(resnet):
    owner = nn.ModuleDict({"perceptual": resnet})
    owner.double()
    try:
        assert next(resnet.net.parameters()).dtype == torch.float64
        assert resnet.mean.dtype == torch.float64
    finally:
        owner.float()


def test_identical_images_have_zero_distance(lpips_vgg, resnet):
    x = images(seed=3)
    with torch.no_grad():
        assert lpips_vgg(x, x).abs().max() < 1e-6
        assert resnet(x[:1], x[:1]).abs().max() < 1e-6


def test_resnet_preprocessing_matches_torchvision_pipeline(resnet):
    T = pytest.importorskip("torchvision.transforms.v2")
    from torchvision.models import ResNet50_Weights

    imagenet = ResNet50_Weights.IMAGENET1K_V1.transforms()  # torchvision's constants for the same weights
    x = images(batch=2, size=40, seed=4)
    reference = T.Compose([T.Resize((224, 224), antialias=True), T.Normalize(imagenet.mean, imagenet.std)])
    torch.testing.assert_close(resnet.preprocess(x), reference((x + 1) / 2), atol=1e-5, rtol=0)

    constant = torch.full((1, 3, 64, 64), 0.5)  # 0.75 in [0, 1]
    expected = (0.75 - torch.tensor(imagenet.mean)) / torch.tensor(imagenet.std)
    out = resnet.preprocess(constant)
    assert out.shape == (1, 3, 224, 224)
    torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_resnet_distance_is_mean_squared_logit_difference(resnet):
    x, y = images(1, seed=5), images(1, seed=6)
    with torch.no_grad():
        expected = (resnet.net(resnet.preprocess(x)) - resnet.net(resnet.preprocess(y))).pow(2).mean(dim=1)
        torch.testing.assert_close(resnet(x, y), expected, atol=1e-5, rtol=1e-4)


def test_wrong_shapes_are_rejected(lpips_vgg):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        lpips_vgg(images(), images()[:, :1])


def test_lpips_vgg_is_the_vgg_variant(lpips_vgg):
    assert isinstance(lpips_vgg, LPIPSVGG) and lpips_vgg.name == "LPIPS-vgg"


def test_lpips_linear_heads_are_the_lpips_package_files(lpips_vgg):
    """The stand-in randomises the trunk only: the learned heads are the package's own v0.1 weights."""
    import importlib.util
    from pathlib import Path

    folder = Path(next(iter(importlib.util.find_spec("lpips").submodule_search_locations)))
    heads = torch.load(folder / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True)
    for k, head in enumerate(lpips_vgg.net.lins):
        torch.testing.assert_close(head.model[-1].weight, heads[f"lin{k}.model.1.weight"])
