"""The pretrained feature networks of the losses and metrics, written here so flowmo needs no torchvision.

- ``vgg16_features()`` / ``alexnet_features()``: the LPIPS backbones (flowmo.perceptual adds the LPIPS heads).
- ``resnet50()``: ResNet-50 (v1.5: the stride sits on the 3x3 conv), the Stage-1B logits loss (spec §3).
- ``fid_inception_v3()``: the TF-ported Inception-v3 of FID (spec §7), behaving like pytorch-fid's
  ``InceptionV3([3], resize_input=True, normalize_input=True)``: [B, 3, H, W] in [0, 1] -> [B, 2048, 1, 1].

Why: the CPU build of torch our users install has no matching torchvision wheel, and importing a mismatched
torchvision crashes; pytorch-fid imports torchvision. The layouts mirror torchvision's ``resnet50`` and
pytorch-fid's FID Inception (torchvision's ``Inception3`` with the FID blocks, no aux head) key for key and
shape for shape, so the official weight files ``resnet50-0676ba61.pth`` and
``pt_inception-2015-12-05-6726825d.pth`` load with ``load_state_dict(strict=True)``. Submodules are
registered in the originals' order, so ``state_dict()`` lists the same keys in the same order.
tests/test_feature_nets.py checks the outputs against the originals (a stored fixture, and the packages
themselves when they are installed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------------
# LPIPS backbones: torchvision's ``vgg16().features`` and ``alexnet().features`` (indices kept, so
# ``features.{i}.*`` of their weight files maps onto layer i)


def _conv_relu(in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> list:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding), nn.ReLU(inplace=True)]


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` (13 3x3 convs in five blocks, each block ends in a 2x2 max pool)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(convs):
            layers += _conv_relu(in_channels, width)
            in_channels = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features``."""
    return nn.Sequential(
        *_conv_relu(3, 64, kernel=11, stride=4, padding=2), nn.MaxPool2d(3, 2),
        *_conv_relu(64, 192, kernel=5, padding=2), nn.MaxPool2d(3, 2),
        *_conv_relu(192, 384), *_conv_relu(384, 256), *_conv_relu(256, 256), nn.MaxPool2d(3, 2),
    )


# ----------------------------------------------------------------------------------------------------------
# Deterministic weights for comparing two implementations


def deterministic_state_dict(layout: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Seeded float32 values for every entry of ``layout`` (a state dict), drawn in sorted key order.

    The values depend only on the key names, shapes and ``seed``, so two implementations with the same
    layout get identical weights. Running variances are positive and BatchNorm scales near 1, so deep
    nets stay numerically tame; integer buffers (``num_batches_tracked``) are zero.
    """
    generator = torch.Generator().manual_seed(seed)
    filled = {key: _seeded_value(key, layout[key], generator) for key in sorted(layout)}
    return {key: filled[key] for key in layout}


def deterministic_fill(module: nn.Module, seed: int, prefix: str = "") -> nn.Module:
    """Load ``deterministic_state_dict`` of the module's own layout into it (strictly); returns the module.

    ``prefix`` names the keys as they sit in a bigger network (e.g. "features." for an LPIPS backbone), so
    the values equal those the bigger layout would get.
    """
    layout = {prefix + key: value for key, value in module.state_dict().items()}
    state = deterministic_state_dict(layout, seed)
    module.load_state_dict({key[len(prefix):]: value for key, value in state.items()}, strict=True)
    return module


def _seeded_value(key: str, like: Tensor, generator: torch.Generator) -> Tensor:
    if not like.is_floating_point():
        return torch.zeros_like(like)

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(like.shape, generator=generator)

    def normal(std: float) -> Tensor:
        return std * torch.randn(like.shape, generator=generator)

    name = key.rsplit(".", 1)[-1]
    if name == "running_var":
        return uniform(0.5, 1.5)
    if name == "running_mean" or name == "bias":
        return normal(0.1)
    if like.dim() == 1:  # a BatchNorm scale
        return uniform(0.5, 1.5)
    # Conv / linear weight at He scale: the signal neither dies nor explodes through the ReLUs, so the
    # outputs depend on the input (at 1/fan_in, Inception's pool3 barely moves with the image).
    fan_in = like[0].numel()
    return normal(math.sqrt(2 / fan_in))


# ----------------------------------------------------------------------------------------------------------
# ResNet-50 (torchvision layout, IMAGENET1K_V1 weights)

RESNET50_BLOCKS = (3, 4, 6, 3)
BOTTLENECK_EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: ResNet v1.5), 1x1 expand, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # A projection shortcut only where the shape changes (key names downsample.0 / downsample.1).
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet50(nn.Module):
    """[B, 3, H, W] ImageNet-normalised -> [B, num_classes] logits."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        for index, (num_blocks, width) in enumerate(zip(RESNET50_BLOCKS, (64, 128, 256, 512)), start=1):
            first_stride = 1 if index == 1 else 2  # layer1 follows the max pool: no further downsampling
            self.add_module(f"layer{index}", _bottleneck_stage(in_channels, width, num_blocks, first_stride))
            in_channels = width * BOTTLENECK_EXPANSION
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        # The random stand-in (weights='random') starts where torchvision's resnet50(weights=None) does:
        # He-normal convs (fan_out), BatchNorm at identity, Linear at PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _bottleneck_stage(in_channels: int, width: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [Bottleneck(in_channels, width, stride)]
    blocks += [Bottleneck(width * BOTTLENECK_EXPANSION, width) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


def resnet50() -> ResNet50:
    """Randomly initialised ResNet-50; load ``resnet50-0676ba61.pth`` (or timm's resnet50.tv_in1k) into it."""
    return ResNet50()


# ----------------------------------------------------------------------------------------------------------
# FID Inception-v3 (pytorch-fid's network, torchvision Inception3 key layout)

FID_INCEPTION_SIZE = 299
FID_INCEPTION_CLASSES = 1008  # the TF graph's classifier: 1000 ImageNet classes plus 8 unused outputs
POOL3_DIM = 2048


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, TF's value) + ReLU; keys ``conv.*`` and ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def tf_avg_pool_3x3(x: Tensor) -> Tensor:
    """3x3 / stride 1 average pool that, like TensorFlow's, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def max_pool_3x3(x: Tensor) -> Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def reduction_max_pool(x: Tensor) -> Tensor:
    """The grid-halving pool of the reduction blocks (3x3, stride 2, no padding)."""
    return F.max_pool2d(x, kernel_size=3, stride=2)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b-d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(tf_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, reduction_max_pool(x)], dim=1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convs: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | pool-1x1."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        row, column = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **column)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **column)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **column)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(tf_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, reduction_max_pool(x)], dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 heads: 1x1 | 1x1-{1x3,3x1} | 1x1-3x3-{1x3,3x1} | pool-1x1.

    ``max_pool``: the FID graph's Mixed_7c pools with a max where Mixed_7b (and the paper) average.
    """

    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__()
        self.pool = max_pool_3x3 if max_pool else tf_avg_pool_3x3
        row, column = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **row)
        self.branch3x3_2b = ConvBN(384, 384, **column)
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = ConvBN(384, 384, **column)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        branch_pool = self.branch_pool(self.pool(x))
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> pool3 features [B, 2048, 1, 1].

    Preprocessing as pytorch-fid's ``resize_input`` / ``normalize_input``: bilinear resize to 299
    (align_corners=False, no antialias), then 2x - 1. ``fc`` (2048 -> 1008) is never run here; it is held
    because the weight file carries it (strict loading) and its weight gives the Inception Score logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(POOL3_DIM, FID_INCEPTION_CLASSES)

    @staticmethod
    def preprocess(images01: Tensor) -> Tensor:
        size = (FID_INCEPTION_SIZE, FID_INCEPTION_SIZE)
        resized = F.interpolate(images01, size=size, mode="bilinear", align_corners=False, antialias=False)
        return 2 * resized - 1

    def forward(self, images01: Tensor) -> Tensor:
        x = self.preprocess(images01)
        for stage in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2,
                      self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,
                      self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.avgpool):
            x = stage(x)
        return x


def fid_inception_v3() -> FIDInceptionV3:
    """Randomly initialised FID Inception; load ``pt_inception-2015-12-05-6726825d.pth`` into it."""
    return FIDInceptionV3()
