"""The workloads the benchmark times and counts, built from the training code itself: the Stage-1A / 1B step is
flowmo_loss + the module's TrainingUpdate (Adam with the module's kernel, weight-norm projection, EMA every 10th
step) and its NonFiniteGuard, the recipes are LossRecipe.for_stage's, decode is the tokenizer's sampler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flowmo.flow import SAMPLERS
from flowmo.losses import LossRecipe, flowmo_loss
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.nn.transformer import _cached_rope
from flowmo.nonfinite import NonFiniteGuard
from flowmo.optim import ModelEMA, TrainingUpdate, WeightNormProjection
from flowmo.perceptual import build_perceptual
from flowmo.settings import OptimSettings

WORKLOADS = ("1a", "1b", "encode", "decode")
TRAINING = ("1a", "1b")


def recipes(feature_nets: str) -> dict[str, LossRecipe]:
    """The paper's two stages, each as LossRecipe.for_stage builds it for the module. Without feature nets
    ("off"): no LPIPS in 1A, and 1B's sample loss is the pixel MSE (still a loss on the back-propagated chain)."""
    random = feature_nets == "random"
    return {
        "1a": LossRecipe(perceptual="lpips_vgg" if random else "none").for_stage("1a"),
        "1b": LossRecipe(perceptual="none", sample_loss="resnet50_logits" if random else "pixel_mse").for_stage("1b"),
    }


@dataclass
class Bundle:
    """The tokenizer plus the frozen nets its losses call, all on one device."""

    tokenizer: FlowMoTokenizer
    perceptual: nn.Module | None
    sample_net: nn.Module
    image_size: int
    recipes: dict[str, LossRecipe]
    update: TrainingUpdate | None = None  # built for timed training steps (not for FLOP counting)
    optimizer: torch.optim.Optimizer | None = None
    guard: NonFiniteGuard | None = None
    sampler: str = "paper"  # what the decode workload runs (flow.SAMPLERS)

    def attach_update(self, device: torch.device) -> None:
        """The module's update on this tokenizer with the paper's OptimSettings: Adam (one group), projection, EMA,
        the guard."""
        settings = OptimSettings()
        ema = ModelEMA.for_settings(self.tokenizer, settings)
        self.update = TrainingUpdate(self.tokenizer, ema, WeightNormProjection(self.tokenizer))
        self.optimizer = TrainingUpdate.adam([{"params": list(self.tokenizer.parameters())}], settings, device)
        self.guard = NonFiniteGuard(settings.max_nonfinite_steps)


def build_feature_nets(feature_nets: str, device) -> tuple[nn.Module | None, nn.Module]:
    """(perceptual net or None, sample net). "random": same cost as the pretrained nets, never downloads."""
    if feature_nets == "random":
        return (
            build_perceptual("lpips_vgg", "random").to(device),
            build_perceptual("resnet50_logits", "random").to(device),
        )
    return None, build_perceptual("pixel_mse")


def build_bundle(
    preset: str,
    device,
    nets: tuple[nn.Module | None, nn.Module],
    image_size: int | None,
    feature_nets: str,
    checkpointing: str = "none",
) -> Bundle:
    tokenizer = FlowMoTokenizer.from_preset(preset, device=device).set_activation_checkpointing(checkpointing)
    return Bundle(tokenizer, *nets, image_size or tokenizer.config.image_size, recipes(feature_nets))


def make_images(bundle: Bundle, batch: int, device) -> Tensor:
    size = bundle.image_size
    return torch.rand(batch, 3, size, size, device=device) * 2 - 1  # [B, 3, H, W] in [-1, 1]


def make_indices(bundle: Bundle, images: Tensor) -> Tensor:
    """Decoder input: the token indices of `images` (computed once, outside timing)."""
    tok = bundle.tokenizer
    with torch.no_grad():
        return tok.quantize(tok.encode(images, check=False), with_losses=False).indices


def free_grads(tokenizer: nn.Module) -> None:
    """What optimizer.zero_grad() does: gradients are freed, not zeroed."""
    for param in tokenizer.parameters():
        param.grad = None


def set_stage(tokenizer: FlowMoTokenizer, stage: str) -> None:
    """Stage 1B trains the decoder alone: the module freezes the encoder, and flowmo_loss then runs it without grad."""
    tokenizer.encoder.requires_grad_(stage == "1a")


def training_step(bundle: Bundle, images: Tensor, stage: str) -> None:
    """One micro-batch of `stage`: forward through flowmo_loss and backward."""
    free_grads(bundle.tokenizer)
    set_stage(bundle.tokenizer, stage)
    recipe = bundle.recipes[stage]
    perceptual = bundle.perceptual if recipe.perceptual_weight else None
    sample_net = bundle.sample_net if recipe.sample_weight else None
    out = flowmo_loss(bundle.tokenizer, images, recipe, perceptual, sample_net)
    if bundle.guard is not None:
        bundle.guard.observe(out.parts)
    out.total.backward()


def encode_call(bundle: Bundle, images: Tensor) -> None:
    with torch.no_grad():
        bundle.tokenizer.quantize(bundle.tokenizer.encode(images, check=False), with_losses=False)


def decode_call(bundle: Bundle, indices: Tensor) -> None:
    bundle.tokenizer.detokenize(indices, image_size=(bundle.image_size, bundle.image_size), sampler=bundle.sampler)


def optimizer_step(bundle: Bundle, images: Tensor, stage: str) -> None:
    """A whole training step: forward, backward, then the guard's flag and the update the training module runs."""
    training_step(bundle, images, stage)
    grads = [p.grad for p in bundle.tokenizer.parameters() if p.grad is not None]
    bundle.update.step(bundle.optimizer, bundle.optimizer.step, bundle.guard.found_inf(grads))


def workload_fn(name: str, bundle: Bundle, images: Tensor, indices: Tensor | None) -> Callable[[], None]:
    """The call timed for `name`; training steps include the update when the bundle has one (timing), not
    when it does not (FLOP counting: the model's forward + backward)."""
    step = optimizer_step if bundle.update is not None else training_step
    if name in TRAINING:
        return lambda: step(bundle, images, name)
    if name == "encode":
        return lambda: encode_call(bundle, images)
    return lambda: decode_call(bundle, indices)


def count_flops(fn: Callable[[], None], by_op: dict | None = None) -> int:
    """Total FLOPs of fn(); `by_op` (optional) receives them per aten op (mm/addmm: linear, bmm: attention)."""
    # The math SDPA backend is made of matmuls the counter knows; the CPU flash kernel is not registered.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    if by_op is not None:
        by_op.update({str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()})
    return counter.get_total_flops()


def flops_per_image(
    preset: str,
    batch: int,
    feature_nets: str,
    image_size: int | None,
    workloads: tuple[str, ...] | list[str] = WORKLOADS,
    checkpointing: str = "none",
    sampler: str = "paper",
) -> dict[str, float]:
    """FLOPs per image of every workload, counted on fake tensors (shapes only: no memory, no compute).

    Fake CPU tensors rather than the meta device: autocast (which the quantizer switches off for its
    losses) does not accept meta. Decode: the CFG interval decides on the host which steps run the
    unconditional pass, which a fake tensor cannot answer; so it is NFE (from the sampler code) x one call.
    """
    nets = build_feature_nets(feature_nets, "cpu")  # built real: their loaders cannot run under fake mode
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):  # so the frozen nets' real weights are faked on use
            counts = _count_workloads(preset, batch, nets, image_size, workloads, feature_nets, checkpointing)
    finally:
        _cached_rope.cache_clear()  # it now holds fake RoPE tables under the key "cpu"
    if "decode" in workloads:
        counts["decode"] = SAMPLERS[sampler].nfe * counts["decoder_call"]
    return {name: value / batch for name, value in counts.items()}


def _count_workloads(
    preset: str, batch: int, nets, image_size: int | None, workloads, feature_nets: str, checkpointing: str = "none"
) -> dict[str, int]:
    bundle = build_bundle(preset, "cpu", nets, image_size, feature_nets, checkpointing)
    images = make_images(bundle, batch, "cpu")
    counts = {name: count_flops(workload_fn(name, bundle, images, None)) for name in workloads if name != "decode"}
    if "decode" not in workloads:
        return counts
    codes = bundle.tokenizer.quantize(bundle.tokenizer.encode(images, check=False), with_losses=False).codes
    by_op: dict[str, int] = {}
    counts["decoder_call"] = count_flops(lambda: bundle.tokenizer.velocity(images, codes, 0.5), by_op)
    counts["decoder_call_attention"] = by_op.get("aten.bmm", 0)  # QK^T and AV of the math SDPA backend
    return counts


def parameter_counts(preset: str) -> dict[str, int]:
    tokenizer = FlowMoTokenizer.from_preset(preset, device="meta")
    encoder = sum(p.numel() for p in tokenizer.encoder.parameters())
    decoder = sum(p.numel() for p in tokenizer.decoder.parameters())
    return {"encoder": encoder, "decoder": decoder, "total": sum(p.numel() for p in tokenizer.parameters())}
