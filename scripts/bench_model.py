"""Model benchmark: ms per step, images/s, peak memory and FLOP utilisation of the FlowMo workloads.

    python scripts/bench_model.py                                  # tiny, batch 8, fp32, cuda if present
    python scripts/bench_model.py --preset lo --batch 8 --precision bf16 --compile --json lo.json
    python scripts/bench_model.py --count-only --preset tiny small lo hi   # FLOPs/params only, no timing

Workloads (spec sections 3-5):
  stage1a  Stage-1A micro-batch: encoder + decoder forward and backward through `flowmo_loss`
           (flow MSE + quantizer losses, + LPIPS-VGG on the x0 estimate with --feature-nets random).
  stage1b  Stage-1B micro-batch: encoder without grad, decoder flow loss + the 8-step checkpointed chain
           sample, backward through the chain. The sample loss is a pixel MSE (--feature-nets off) or a
           random-weight ResNet-50 logit distance (random): without a sample loss the chain would not run.
  encode   encoder + LFQ indices (inference; the input range check is skipped: it is validation, not model).
  decode   `detokenize`: the paper's 25-step rho=4 sampler with CFG 1.5 on its interval = 31 NFE.
Training steps are forward + backward only: no optimizer step (Adam moments are 8 bytes/param more memory).

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, counted once on fake tensors (free even for
FlowMo-Lo, and identical on every device) with the math attention backend (the CPU flash-attention kernel
is not in the counter's registry, so counting it as is would miss attention). Utilisation = model FLOP/s over the FLOP/s of an NxN
matmul timed in the same run at the same dtype and device. Printed figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flowmo import presets
from flowmo.losses import LossRecipe, flowmo_loss
from flowmo.nn.tokenizer import PAPER_SAMPLER, FlowMoTokenizer
from flowmo.nn.transformer import _cached_rope
from flowmo.perceptual import build_perceptual

WORKLOADS = ("stage1a", "stage1b", "encode", "decode")
RECIPE_1A = LossRecipe()  # paper Stage 1A: flow + 0.1 perceptual + quantizer, encoder trained
RECIPE_1B = LossRecipe(perceptual_weight=0.0, sample_weight=0.01, train_encoder=False)
# Spec section 9 estimates, FLOPs per 256x256 image for FlowMo-Lo/Hi (the spec's "[est]" numbers).
SPEC_9 = {"encoder forward": 1.2e12, "decoder forward (1 NFE)": 4.7e12, "stage1a step": 16.5e12,
          "stage1b step": 165e12, "decode (31 NFE)": 31 * 4.7e12}
SPEC_9_NOTE = "stage1a: spec gives 15-18 TFLOP (fwd+bwd), midpoint shown"


# ------------------------------------------------------------------------------------------ the model under test
@dataclass
class Bundle:
    """The tokenizer plus the frozen nets its losses call, all on one device."""

    tokenizer: FlowMoTokenizer
    perceptual: nn.Module | None
    sample_net: nn.Module
    image_size: int


class PixelDistance(nn.Module):
    """Per-sample pixel MSE: a free sample loss so Stage 1B still runs (and back-propagates) its chain."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return (x - y).pow(2).mean(dim=(1, 2, 3))


def build_feature_nets(feature_nets: str, device) -> tuple[nn.Module | None, nn.Module]:
    """(perceptual net or None, sample net). "random": same cost as the pretrained nets, never downloads."""
    if feature_nets == "random":
        return (build_perceptual("lpips_vgg", "random").to(device),
                build_perceptual("resnet50_logits", "random").to(device))
    return None, PixelDistance()


def build_bundle(preset: str, device, nets: tuple[nn.Module | None, nn.Module], image_size: int | None) -> Bundle:
    tokenizer = FlowMoTokenizer.from_preset(preset, device=device)
    return Bundle(tokenizer, *nets, image_size or tokenizer.config.image_size)


def make_images(bundle: Bundle, batch: int, device) -> Tensor:
    size = bundle.image_size
    return torch.rand(batch, 3, size, size, device=device) * 2 - 1  # [B, 3, H, W] in [-1, 1]


def make_indices(bundle: Bundle, images: Tensor) -> Tensor:
    """Decoder input: the token indices of `images` (computed once, outside timing)."""
    tok = bundle.tokenizer
    with torch.no_grad():
        return tok.quantize(tok.encode(images, check=False), with_losses=False).indices


# ------------------------------------------------------------------------------------------ workloads
def free_grads(tokenizer: nn.Module) -> None:
    """What optimizer.zero_grad() does: gradients are freed, not zeroed."""
    for param in tokenizer.parameters():
        param.grad = None


def training_step(bundle: Bundle, images: Tensor, recipe: LossRecipe) -> None:
    """One micro-batch: forward through flowmo_loss and backward."""
    free_grads(bundle.tokenizer)
    perceptual = bundle.perceptual if recipe.perceptual_weight else None
    sample_net = bundle.sample_net if recipe.sample_weight else None
    flowmo_loss(bundle.tokenizer, images, recipe, perceptual, sample_net).total.backward()


def encode_call(bundle: Bundle, images: Tensor) -> None:
    with torch.no_grad():
        bundle.tokenizer.quantize(bundle.tokenizer.encode(images, check=False), with_losses=False)


def decode_call(bundle: Bundle, indices: Tensor) -> None:
    bundle.tokenizer.detokenize(indices, image_size=(bundle.image_size, bundle.image_size))


def workload_fn(name: str, bundle: Bundle, images: Tensor, indices: Tensor | None) -> Callable[[], None]:
    if name == "stage1a":
        return lambda: training_step(bundle, images, RECIPE_1A)
    if name == "stage1b":
        return lambda: training_step(bundle, images, RECIPE_1B)
    if name == "encode":
        return lambda: encode_call(bundle, images)
    return lambda: decode_call(bundle, indices)


# ------------------------------------------------------------------------------------------ FLOP counting
class _CountCalls:
    """Stands in for the tokenizer inside `FlowMoTokenizer.sample`: counts velocity calls (NFE)."""

    def __init__(self) -> None:
        self.calls = 0

    def velocity(self, noisy: Tensor, codes, t) -> Tensor:
        self.calls += 1
        return torch.zeros_like(noisy)

    def _check_sample_inputs(self, codes, noise, steps) -> None:
        """The real tokenizer checks shapes here; the counter's stand-in inputs have none to check."""


def sampler_nfe(**sampler) -> int:
    """Network evaluations of the real sampler code (grid, CFG interval) for these settings."""
    counter = _CountCalls()
    FlowMoTokenizer.sample(counter, torch.zeros(1), torch.zeros(1, 3, 1, 1), **{**PAPER_SAMPLER, **sampler})
    return counter.calls


def count_flops(fn: Callable[[], None], by_op: dict | None = None) -> int:
    """Total FLOPs of fn(); `by_op` (optional) receives them per aten op (mm/addmm: linear, bmm: attention)."""
    # The math SDPA backend is made of matmuls the counter knows; the CPU flash kernel is not registered.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    if by_op is not None:
        by_op.update({str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()})
    return counter.get_total_flops()


def flops_per_image(preset: str, batch: int, feature_nets: str, image_size: int | None) -> dict[str, float]:
    """FLOPs per image of every workload, counted on fake tensors (shapes only: no memory, no compute).

    Fake CPU tensors rather than the meta device: autocast (which the quantizer switches off for its
    losses) does not accept meta. Decode: the CFG interval decides on the host which steps run the
    unconditional pass, which a fake tensor cannot answer; so it is NFE (from the sampler code) x one call.
    """
    nets = build_feature_nets(feature_nets, "cpu")  # built real: their loaders cannot run under fake mode
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):  # so the frozen nets' real weights are faked on use
            counts = _count_workloads(preset, batch, nets, image_size)
    finally:
        _cached_rope.cache_clear()  # it now holds fake RoPE tables under the key "cpu"
    counts["decode"] = sampler_nfe() * counts["decoder_call"]
    return {name: value / batch for name, value in counts.items()}


def _count_workloads(preset: str, batch: int, nets, image_size: int | None) -> dict[str, int]:
    bundle = build_bundle(preset, "cpu", nets, image_size)
    images = make_images(bundle, batch, "cpu")
    counts = {name: count_flops(workload_fn(name, bundle, images, None)) for name in WORKLOADS[:3]}
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


# ------------------------------------------------------------------------------------------ timing and memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call after `warmup` untimed calls (compilation, allocator and cache warm-up)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)  # CUDA launches are asynchronous: time the work, not the launch
        seconds.append(time.perf_counter() - start)
    return seconds


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """GPU: max_memory_allocated (absolute, weights included). CPU: peak RSS growth over the start (Linux:
    the VmHWM high-water mark reset through /proc/self/clear_refs), else None."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        result["peak_mib"], result["memory_kind"] = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
        return
    baseline = _reset_rss_peak()
    yield
    peak = _proc_status_kib("VmHWM")
    ok = baseline is not None and peak is not None
    result["peak_mib"] = (peak - baseline) / 1024 if ok else None
    result["memory_kind"] = "RSS growth" if ok else "n/a"


def _reset_rss_peak() -> int | None:
    """Give freed heap back to the OS and restart the RSS high-water mark; returns the RSS now (KiB)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # else pages freed by the last workload hide this one's growth
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_kib("VmRSS")


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """The attainable-FLOP/s reference: an n x n matmul, median of `iters` timed calls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(time_calls(lambda: torch.mm(a, b), device, warmup=2, iters=iters))
    return 2 * n**3 / seconds


# ------------------------------------------------------------------------------------------ the benchmark
@dataclass
class Row:
    workload: str
    ms: float  # median
    min_ms: float  # the best call: the steadier figure on a shared or throttled machine
    images_per_s: float
    peak_mib: float | None
    memory_kind: str
    flops_per_image: float
    flops_per_s: float
    utilisation: float
    all_ms: list[float] = field(default_factory=list)


def precision_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(name: str, fn, args, device: torch.device, flops: float, matmul: float) -> Row:
    memory: dict = {}
    with peak_memory(device, memory), precision_context(device, args.precision):
        seconds = time_calls(fn, device, args.warmup, args.iters)
    median = statistics.median(seconds)
    rate = args.batch * flops / median
    return Row(name, 1e3 * median, 1e3 * min(seconds), args.batch / median, memory["peak_mib"], memory["memory_kind"], flops, rate,
               rate / matmul, [1e3 * s for s in seconds])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def benchmark_preset(preset: str, args, device: torch.device) -> dict:
    """Time every selected workload of one preset; returns the JSON-able report."""
    flops = flops_per_image(preset, args.batch, args.feature_nets, args.image_size)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    size = args.matmul_size or (4096 if device.type == "cuda" else 2048)
    matmul = matmul_flops_per_s(device, dtype, size, iters=20 if device.type == "cuda" else 5)
    bundle = build_bundle(preset, device, build_feature_nets(args.feature_nets, device), args.image_size)
    if args.compile:  # as module.py does: compile the two transformers, keep the loss code eager
        bundle.tokenizer.encoder.compile()
        bundle.tokenizer.decoder.compile()
    images = make_images(bundle, args.batch, device)
    indices = make_indices(bundle, images)
    rows = []
    for name in args.workloads:
        free_grads(bundle.tokenizer)  # else the last step's gradients count in the next workload's peak memory
        rows.append(measure(name, workload_fn(name, bundle, images, indices), args, device, flops[name], matmul))
    return {"preset": preset, "device": describe_device(device), "batch": args.batch,
            "image_size": bundle.image_size, "precision": args.precision, "compile": args.compile,
            "feature_nets": args.feature_nets, "warmup": args.warmup, "iters": args.iters,
            "params": parameter_counts(preset), "decode_nfe": sampler_nfe(),
            "decoder_call_flops_per_image": flops["decoder_call"], "matmul_size": size,
            "matmul_flops_per_s": matmul, "torch": torch.__version__, "rows": [asdict(row) for row in rows]}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------ printing
def _mem(row: dict) -> str:
    return "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f} MiB"


def print_report(report: dict) -> None:
    params = report["params"]["total"] / 1e6
    print(f"\nFlowMo {report['preset']} ({report['image_size']}x{report['image_size']}, {params:.2f}M params), "
          f"batch {report['batch']}, {report['precision']}{' + compile' if report['compile'] else ''}, "
          f"{report['device']}, torch {report['torch']}, feature nets {report['feature_nets']}")
    print(f"reference matmul {report['matmul_size']}^2 {report['precision']}: "
          f"{report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; median of {report['iters']} after "
          f"{report['warmup']} warm-up; decode = {report['decode_nfe']} NFE")
    print(f"{'workload':<10}{'ms/call':>11}{'min ms':>10}{'img/s':>10}{'peak mem':>12}{'GFLOP/img':>12}{'GFLOP/s':>10}"
          f"{'util':>8}")
    for row in report["rows"]:
        print(f"{row['workload']:<10}{row['ms']:>11.2f}{row['min_ms']:>10.2f}{row['images_per_s']:>10.1f}{_mem(row):>12}"
              f"{row['flops_per_image'] / 1e9:>12.4g}{row['flops_per_s'] / 1e9:>10.1f}{row['utilisation']:>8.1%}")
    print(f"peak mem: {report['rows'][0]['memory_kind'] if report['rows'] else ''}; util = model FLOP/s / matmul "
          f"FLOP/s; training rows are forward + backward of one micro-batch (no optimizer step)")


def count_report(preset: str, batch: int, feature_nets: str, image_size: int | None) -> dict:
    flops = flops_per_image(preset, batch, feature_nets, image_size)
    size = image_size or presets.get(preset).image_size
    return {"preset": preset, "image_size": size, "params": parameter_counts(preset), "decode_nfe": sampler_nfe(),
            "flops_per_image": {"encoder forward": flops["encode"], "decoder forward (1 NFE)": flops["decoder_call"],
                                "stage1a step": flops["stage1a"], "stage1b step": flops["stage1b"],
                                "decode (31 NFE)": flops["decode"]},
            "decoder_forward_attention_flops_per_image": flops["decoder_call_attention"]}


COUNT_COLUMNS = {"encoder forward": "enc fwd", "decoder forward (1 NFE)": "dec fwd", "stage1a step": "1A step",
                 "stage1b step": "1B step", "decode (31 NFE)": "decode"}


def print_counts(reports: list[dict]) -> None:
    print("\nFLOPs per image in TFLOP (FlopCounterMode on fake tensors); parameters in millions")
    print(f"{'preset':<8}{'res':>5}{'enc M':>8}{'dec M':>8}{'total M':>9}"
          + "".join(f"{c:>11}" for c in COUNT_COLUMNS.values()) + f"{'dec attn':>11}")
    for r in reports:
        p, f = r["params"], r["flops_per_image"]
        print(f"{r['preset']:<8}{r['image_size']:>5}{p['encoder'] / 1e6:>8.1f}{p['decoder'] / 1e6:>8.1f}"
              f"{p['total'] / 1e6:>9.1f}" + "".join(f"{f[k] / 1e12:>11.4g}" for k in COUNT_COLUMNS)
              + f"{r['decoder_forward_attention_flops_per_image'] / 1e12:>11.4g}")
    print(f"{'spec §9':<8}{256:>5}{'':>25}" + "".join(f"{SPEC_9[k] / 1e12:>11.4g}" for k in COUNT_COLUMNS)
          + f"{1.4:>11.4g}")
    print(f"dec fwd = one decoder call (1 NFE), dec attn = its attention part; decode = {reports[0]['decode_nfe']} "
          f"NFE; training steps are forward + backward (1B: 8-step chain, checkpointed).\n({SPEC_9_NOTE}; "
          "spec §9 is for lo/hi at 256x256)")


# ------------------------------------------------------------------------------------------ entry point
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["tiny"], choices=presets.names())
    parser.add_argument("--batch", type=int, default=8, help="images per call (a micro-batch for training)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = bf16 autocast")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--compile", action="store_true", help="torch.compile encoder and decoder")
    parser.add_argument("--feature-nets", choices=("off", "random"), default="off",
                        help="off: no LPIPS, pixel MSE as 1B sample loss; random: random-weight LPIPS-VGG / ResNet-50")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per workload (median reported)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's training size")
    parser.add_argument("--matmul-size", type=int, default=None, help="reference matmul N (default 4096 GPU, 2048 CPU)")
    parser.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                        help="torch.set_float32_matmul_precision (training uses medium = TF32 on GPU)")
    parser.add_argument("--count-only", action="store_true", help="print FLOPs and params per preset, no timing")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count_only:
        reports = [count_report(p, args.batch, args.feature_nets, args.image_size) for p in args.preset]
        print_counts(reports)
    else:
        device = pick_device(args.device)
        reports = [benchmark_preset(p, args, device) for p in args.preset]
        for report in reports:
            print_report(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"reports": reports}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
