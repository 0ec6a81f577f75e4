"""The memory planner: predicted peak training memory per preset, stage, micro-batch, precision and activation
checkpointing, counted on fake tensors (shapes only: seconds on a CPU, nothing allocated).

    flowmo plan --preset lo --stage 1a --batch 8 4 --checkpointing none blocks

What is counted, and how:
- activations, gradients and temporaries: one Stage-1A / 1B micro-batch (flowmo_loss, forward + backward, the
  frozen LPIPS-VGG / ResNet-50 included) runs on fake tensors under torch's MemTracker, which follows every
  storage's lifetime; its peak is the live total at the worst moment of forward + backward;
- bf16 as CUDA autocast runs it: the matmuls, convolutions and attention in bf16 (CPU autocast casts those the same
  way), and, on top, CUDA's fp32 list (layer_norm, softmax, pow, exp, log, the MSE and norm reductions) and its
  promote list (addcmul, cat, stack: the widest input dtype), which CPU autocast does not apply
  (`CudaAutocastPolicy`);
- what lives across steps, from the parameter count: fp32 weights, Adam's two moments and the EMA copy per
  trainable (resp. every) weight, the weight-norm targets, and under DDP the gradient buckets (none with
  gradient_as_bucket_view, where the gradients are views into the buckets).

Not counted: the CUDA context (~0.5 GiB), NCCL buffers, cuDNN / flash workspaces and allocator fragmentation: the
`reserve` column is what is left of the card, which these must fit in.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from flowmo import losses
from flowmo.bench.workloads import (
    build_bundle,
    build_feature_nets,
    flops_per_image,
    free_grads,
    make_images,
    optimizer_step,
    recipes,
    set_stage,
)
from flowmo.losses import flowmo_loss
from flowmo.nn import transformer
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.nn.transformer import _cached_rope
from flowmo.perceptual import build_perceptual
from flowmo.presets import resolve_config

GIB = 2**30
CARD_GIB = {"h100-80gb": 79.1, "a100-80gb": 79.1, "a100-40gb": 39.4, "h200": 139.8}  # usable, as torch reports
PRECISIONS = ("bf16-mixed", "32-true")
CHECKPOINTING = ("none", "blocks", "every_2")


# ------------------------------------------------------------------------------------------- CUDA autocast
# CUDA autocast's fp32 and promote lists (torch/csrc/autograd: autocast_mode.cpp) for the functions FlowMo and
# its loss nets call; CPU autocast (used below for the lower-precision casts, identical on both devices for
# linear / matmul / conv / SDPA) leaves these in the input's dtype, so they are applied here.
_FP32_FUNCTIONS = {
    F.layer_norm,
    F.group_norm,
    F.softmax,
    F.log_softmax,
    F.mse_loss,
    F.cosine_similarity,
    torch.exp,
    torch.log,
    torch.pow,
    torch.rsqrt,
    torch.norm,
    torch.Tensor.exp,
    torch.Tensor.log,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    torch.Tensor.rsqrt,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    torch.Tensor.norm,
    torch.linalg.vector_norm,
    torch.softmax,
}
_PROMOTE_FUNCTIONS = {torch.addcmul, torch.addcdiv, torch.cat, torch.stack, torch.Tensor.addcmul}


class CudaAutocastPolicy(TorchFunctionMode):
    """Inside an enabled (CPU) bf16 autocast region, casts as CUDA autocast would for its fp32 and promote lists."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cpu"):
            if func in _FP32_FUNCTIONS:
                args, kwargs = _cast_floats((args, kwargs), torch.float32)
            elif func in _PROMOTE_FUNCTIONS:
                dtypes = [t.dtype for t in _tensors((args, kwargs)) if t.is_floating_point()]
                if dtypes:
                    widest = max(dtypes, key=lambda d: torch.finfo(d).bits)
                    args, kwargs = _cast_floats((args, kwargs), widest)
        return func(*args, **kwargs)


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def _cast_floats(tree, dtype: torch.dtype):
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() and tree.dtype != dtype else tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast_floats(item, dtype) for item in tree)
    if isinstance(tree, dict):
        return {key: _cast_floats(value, dtype) for key, value in tree.items()}
    return tree


# ------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    preset: str
    stage: str
    micro_batch: int
    precision: str
    checkpointing: str
    image_size: int
    ranks: int
    parameters: int
    weights_gib: float  # fp32 master weights, tokenizer + frozen loss nets
    adam_gib: float
    ema_gib: float
    ddp_buckets_gib: float
    step_peak_gib: float  # activations + gradients + temporaries at the worst moment of forward + backward
    activations_gib: float  # of which activations (saved for backward) at that moment
    total_gib: float

    def row(self) -> list[str]:
        return [
            self.preset,
            self.stage,
            str(self.micro_batch),
            self.precision,
            self.checkpointing,
            f"{self.weights_gib:.1f}",
            f"{self.adam_gib + self.ema_gib + self.ddp_buckets_gib:.1f}",
            f"{self.activations_gib:.1f}",
            f"{self.step_peak_gib:.1f}",
            f"{self.total_gib:.1f}",
        ]


HEADER = [
    "preset",
    "stage",
    "micro-batch",
    "precision",
    "checkpointing",
    "weights",
    "Adam+EMA+DDP",
    "activations",
    "step peak",
    "total GiB",
]


def plan(
    preset: str,
    stage: str = "1a",
    micro_batch: int = 8,
    precision: str = "bf16-mixed",
    checkpointing: str = "none",
    image_size: int | None = None,
    ranks: int = 8,
    gradient_as_bucket_view: bool = True,
    autocast: str = "cuda",
) -> MemoryPlan:
    """Predicted peak memory of one rank's training step (GiB): counted on fake tensors, nothing allocated.
    autocast: "cuda" models CUDA's bf16 autocast (the GPU runs); "cpu" is CPU autocast as it is (the CPU check)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    config = resolve_config(preset)
    size = image_size or config.image_size
    recipe = recipes("random")[stage]
    nets = _loss_nets(recipe)  # real modules (their builders read files); faked on first use below
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            tokenizer = FlowMoTokenizer(config).set_activation_checkpointing(checkpointing)
            set_stage(tokenizer, stage)
            weights, peak, activations = _step_peak(tokenizer, recipe, nets, micro_batch, size, precision, autocast)
    finally:
        _cached_rope.cache_clear()  # it now holds fake RoPE tables under the key "cpu"
    total_params = sum(p.numel() for p in tokenizer.parameters())
    trained = [tokenizer.encoder, tokenizer.decoder] if stage == "1a" else [tokenizer.decoder]
    trainable = sum(p.numel() for part in trained for p in part.parameters())  # the quantizer has no weights
    adam, ema = 8 * trainable, 4 * total_params
    buckets = 0 if gradient_as_bucket_view or ranks == 1 else 4 * trainable
    total = peak + adam + ema + buckets  # the tracker's peak holds the weights, gradients and activations
    return MemoryPlan(
        preset,
        stage,
        micro_batch,
        precision,
        checkpointing,
        size,
        ranks,
        total_params,
        weights / GIB,
        adam / GIB,
        ema / GIB,
        buckets / GIB,
        (peak - weights) / GIB,
        activations / GIB,
        total / GIB,
    )


def _loss_nets(recipe):
    """The frozen nets the stage's losses call, random weights (same shapes and cost as the pretrained ones)."""
    perceptual = build_perceptual(recipe.perceptual, "random") if recipe.perceptual_weight else None
    sample = build_perceptual(recipe.sample_loss, "random") if recipe.sample_weight else None
    return perceptual, sample


def _step_peak(
    tokenizer: FlowMoTokenizer, recipe, nets, batch: int, size: int, precision: str, autocast_kind: str = "cuda"
) -> tuple[int, int, int]:
    """Live bytes of (the weights of every net, the peak during forward + backward, the activations at the end of
    forward). A frozen encoder needs nothing here: flowmo_loss runs it without grad (set_stage)."""
    perceptual, sample = nets
    images = torch.rand(batch, 3, size, size) * 2 - 1
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    policy = autocast_kind == "cuda"
    with (
        LiveBytes() as live,
        CudaAutocastPolicy() if policy else contextlib.nullcontext(),
        _policy_in_recomputation() if policy else contextlib.nullcontext(),
    ):
        for module in (tokenizer, *[net for net in nets if net is not None]):
            live.add(*module.parameters(), *module.buffers())
        weights = live.now
        with autocast:
            out = flowmo_loss(tokenizer, images, recipe, perceptual, sample, torch.Generator())
        after_forward = live.now
        out.total.backward()
    return weights, live.peak, after_forward - weights


@contextlib.contextmanager
def _policy_in_recomputation():
    """Activation checkpointing recomputes inside backward, where torch runs no function mode: the recomputation
    re-enters the policy through checkpoint's own context_fn hook (in the two modules that checkpoint)."""

    def with_policy(function, *args, **kwargs):
        return checkpoint(
            function, *args, context_fn=lambda: (contextlib.nullcontext(), CudaAutocastPolicy()), **kwargs
        )

    saved = transformer.checkpoint, losses.checkpoint
    transformer.checkpoint = losses.checkpoint = with_policy
    try:
        yield
    finally:
        transformer.checkpoint, losses.checkpoint = saved


class LiveBytes(TorchDispatchMode):
    """Bytes of every storage alive, and their peak: a storage is counted when an op first returns it and
    uncounted when it is freed. Written here because torch's MemTracker also hooks every module's parameters
    for their gradients and refuses frozen ones (the LPIPS and ResNet-50 weights)."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def add(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage in self._seen:
                continue
            size = storage.nbytes()
            self._seen[storage] = size
            weakref.finalize(storage, self._free, size)
            self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, size: int) -> None:
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(*[t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


# ------------------------------------------------------------------------------------------- the CPU check
def measured_step_peak(
    preset: str, stage: str = "1a", micro_batch: int = 8, precision: str = "32-true", checkpointing: str = "none"
) -> float:
    """What a real training step on this CPU allocates at its peak above the weights (GiB): the optimizer step of
    the benchmark (the module's update) after one warm-up step, every allocation of torch's CPU allocator
    followed by the profiler; gradients are freed before the step, as zero_grad does. The analogue of
    torch.cuda.max_memory_allocated on a GPU, which the planner's `step peak` predicts."""
    torch.manual_seed(0)
    nets = build_feature_nets("random", "cpu")
    bundle = build_bundle(preset, "cpu", nets, None, "random")
    bundle.tokenizer.set_activation_checkpointing(checkpointing)
    bundle.attach_update(torch.device("cpu"))
    images = make_images(bundle, micro_batch, "cpu")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        optimizer_step(bundle, images, stage)  # warm-up: Adam's moments exist from here on
    free_grads(bundle.tokenizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        with autocast:
            optimizer_step(bundle, images, stage)
    events = sorted(
        (e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    return max(itertools.accumulate(e.nbytes() for e in events)) / GIB


# ------------------------------------------------------------------------------------------- the table
def table(plans: list[MemoryPlan], card: str = "h100-80gb") -> str:
    usable = CARD_GIB[card]
    lines = ["| " + " | ".join(HEADER + [f"reserve on {card}"]) + " |", "|" + "---|" * (len(HEADER) + 1)]
    for p in plans:
        lines.append("| " + " | ".join(p.row() + [f"{usable - p.total_gib:.1f}"]) + " |")
    return "\n".join(lines)


def recompute_flops(preset: str, stage: str, checkpointing: str) -> float:
    """Extra FLOPs of a training step with this activation checkpointing, as a fraction of the step without:
    both counted on fake tensors (one image, the stage's loss nets included), recomputation in backward included."""
    if checkpointing == "none":
        return 0.0
    counts = [
        flops_per_image(preset, 1, "random", None, (stage,), setting)[stage] for setting in ("none", checkpointing)
    ]
    return counts[1] / counts[0] - 1


def plans(presets, stages, batches, precisions, checkpointing, ranks: int = 8) -> list[MemoryPlan]:
    return [
        plan(preset, stage, batch, precision, setting, ranks=ranks)
        for preset in presets
        for stage in stages
        for batch in batches
        for precision in precisions
        for setting in checkpointing
    ]
