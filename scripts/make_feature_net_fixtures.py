"""Write tests/fixtures/feature_nets_reference.pt: outputs of torchvision's ResNet-50, pytorch-fid's FID Inception and
the lpips package's LPIPS on seeded weights.

flowmo builds these networks through timm (ResNet-50), pytorch-fid and lpips; tests/test_feature_nets.py checks
that they give these numbers (a regression test of the library path: the fixture was first made to check
hand-written copies, which it showed equal to 0.0, and which the libraries have since replaced). The recipe:

1. build the reference network (torchvision ``resnet50(weights=None)``; pytorch-fid ``InceptionV3([3],
   resize_input=True, normalize_input=True)`` with its weight download answered by an in-memory state dict;
   ``lpips.LPIPS(net=vgg|alex, version='0.1')`` with its learned heads and a backbone filled as in 2.),
2. give every parameter and buffer ``deterministic_state_dict(layout, seed)`` (seeded float32 values drawn
   in sorted key order: the same values reach any implementation with the same key names and shapes),
3. run it in float64 on a seeded input batch (2 images, 64x64: in [0, 1] for Inception, standard normal,
   i.e. ImageNet-normalised-like, for ResNet; LPIPS compares 2x-1 of the [0, 1] images with 2x-1 of a second
   seeded [0, 1] batch),
4. save the outputs (float64), the state-dict key lists and shapes, the seeds and checksums of the inputs.

Only outputs are stored (a few tens of KB), no weights. The committed fixture was made with torch 2.14.1
(+cu130, run on CPU), torchvision 0.29.1, pytorch-fid 0.3.0 and lpips 0.1.4:

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/make_feature_net_fixtures.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from seeded_weights import deterministic_state_dict  # noqa: E402 (tests/ is not a package)

FILL_SEED = 1234
INPUT_SEED = 0
INPUT_SHAPE = (2, 3, 64, 64)
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "feature_nets_reference.pt"


def fixture_inputs(seed: int = INPUT_SEED, shape: tuple[int, ...] = INPUT_SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1] for Inception, standard-normal images for ResNet), float64; tests regenerate them."""
    generator = torch.Generator().manual_seed(seed)
    images01 = torch.rand(shape, generator=generator, dtype=torch.float64)
    normalised = torch.randn(shape, generator=generator, dtype=torch.float64)
    return images01, normalised


def reference_resnet50(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    state = deterministic_state_dict(model.state_dict(), seed)
    model.load_state_dict(state, strict=True)
    return model, state


def pytorch_fid_layout() -> dict[str, torch.Tensor]:
    """The state dict of pytorch-fid's Inception3-with-FID-blocks: the key layout of its weight file."""
    import torchvision.models
    from pytorch_fid import inception as fid_inception

    captured = {}

    def capture_instead_of_loading(model, state_dict, *args, **kwargs):
        captured.update(model.state_dict())

    with (
        mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: None),
        mock.patch.object(torchvision.models.Inception3, "load_state_dict", capture_instead_of_loading),
    ):
        fid_inception.fid_inception_v3()
    return captured


def reference_fid_inception(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    from pytorch_fid import inception as fid_inception

    state = deterministic_state_dict(pytorch_fid_layout(), seed)
    # pytorch-fid always asks its URL loader for the weights: answer with the filled state dict
    # (it loads it strictly into its Inception3).
    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        model = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
    return model, state


def lpips_second_images(seed: int = INPUT_SEED, shape: tuple[int, ...] = INPUT_SHAPE) -> torch.Tensor:
    """The other side of each LPIPS pair, in [-1, 1], float64; tests regenerate it."""
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1


def reference_lpips(net: str, seed: int) -> torch.nn.Module:
    """The lpips package's LPIPS v0.1 with its heads and a trunk filled in torchvision's ``features.{i}`` layout."""
    import lpips

    model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    backbone_layout = {"features." + k.split(".", 1)[1]: v for k, v in model.net.state_dict().items()}
    state = deterministic_state_dict(backbone_layout, seed)
    with torch.no_grad():
        for block in model.net.children():  # lpips keeps torchvision's layer index as each child's name
            for index, layer in block.named_children():
                for name, param in layer.named_parameters():
                    param.copy_(state[f"features.{index}.{name}"])
    return model.eval()


def layout(state: dict[str, torch.Tensor]) -> tuple[list[str], list[tuple[int, ...]]]:
    return list(state), [tuple(value.shape) for value in state.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    import pytorch_fid
    import torchvision

    images01, normalised = fixture_inputs()
    resnet, resnet_state = reference_resnet50(FILL_SEED)
    inception, inception_state = reference_fid_inception(FILL_SEED)
    with torch.no_grad():
        resnet_logits = resnet.double().eval()(normalised)
        (inception_pool3,) = inception.double().eval()(images01)
        lpips_distances = {net: reference_lpips(net, FILL_SEED).double()(images01 * 2 - 1, lpips_second_images())
                           .flatten() for net in ("vgg", "alex")}
    resnet_keys, resnet_shapes = layout(resnet_state)
    inception_keys, inception_shapes = layout(inception_state)
    fixture = {
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
                     "pytorch_fid": str(pytorch_fid.__version__), "lpips": importlib.metadata.version("lpips")},
        "fill_seed": FILL_SEED,
        "input_seed": INPUT_SEED,
        "input_shape": list(INPUT_SHAPE),
        "input_checksums": {"images01": float(images01.sum()), "normalised": float(normalised.sum())},
        "resnet50": {"keys": resnet_keys, "shapes": resnet_shapes, "logits": resnet_logits},
        "fid_inception": {"keys": inception_keys, "shapes": inception_shapes, "pool3": inception_pool3},
        "lpips": lpips_distances,  # [2] per net: LPIPS(2 * images01 - 1, lpips_second_images())
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1024:.0f} KB): ResNet-50 logits "
          f"{tuple(resnet_logits.shape)}, Inception pool3 {tuple(inception_pool3.shape)}")


if __name__ == "__main__":
    main()
