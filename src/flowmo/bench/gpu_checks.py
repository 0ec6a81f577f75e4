"""The checks of `make gpu-check` (flowmo.bench.gpu_check runs each in a process of its own, with a deadline):

    python -m flowmo.bench.gpu_checks memory --out results/gpu-check [--preset lo --device cuda ...]

Every finding is appended to OUT/report.md as soon as it is measured; a check that raises writes one "failed" line and
exits 1.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from flowmo.bench import model as bench
from flowmo.bench.gpu_check import Report
from flowmo.bench.memory import plan
from flowmo.bench.workloads import build_bundle, build_feature_nets, make_images, optimizer_step
from flowmo.nn.transformer import DecoderTransformer, EncoderTransformer

DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # the vendors' dense bf16 peaks


def bench_rows(args, label: str, *extra: str) -> list[dict]:
    """One `make bench` run; returns its rows (merged into OUT/bench.json, where each call's label is its own)."""
    json_path = args.out / "bench.json"
    bench.main(
        [
            "--preset",
            args.preset,
            "--precision",
            "bf16",
            "--device",
            args.device,
            "--feature-nets",
            "random",
            "--warmup",
            str(args.warmup),
            "--iters",
            str(args.iters),
            "--json",
            str(json_path),
            "--label",
            label,
            *extra,
        ]
    )
    return [row for row in json.loads(json_path.read_text()) if row["label"] == label]


def peak_tflops(device: str) -> float | None:
    if not torch.cuda.is_available() or device == "cpu":
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in DENSE_BF16_TFLOPS.items() if key in name), None)


def check_memory_and_speed(args, report: Report) -> None:
    """Check 1: memory against the plan, ms and MFU, the SDPA backend and the profile split."""
    for batch in (8, 4):
        rows = bench_rows(
            args,
            f"gpu-check 1a b{batch}",
            "--workloads",
            "1a",
            "--batch",
            str(batch),
            "--checkpointing",
            args.checkpointing,
            *(["--profile"] if batch == 8 else []),
        )
        row = rows[0]
        predicted = plan(args.preset, "1a", batch, "bf16-mixed", args.checkpointing, ranks=1).total_gib
        reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
        report.line(
            f"1a micro-batch {batch} ({args.checkpointing}): peak allocated {row['peak_mem_mb'] / 1024:.1f} GiB"
            if row.get("peak_mem_mb")
            else f"1a micro-batch {batch}: peak n/a"
        )
        report.line(
            f"  planner (1 rank, no DDP buckets) {predicted:.1f} GiB; reserved "
            f"{'n/a' if reserved is None else f'{reserved:.1f} GiB'}"
        )
        peak = peak_tflops(args.device)
        flops = row["model_flops"] / row["batch"]
        mfu = "n/a" if peak is None else f"{100 * row['images_per_s'] * flops / (peak * 1e12):.1f}%"
        report.line(
            f"  {row['ms']:.0f} ms per step, {row['images_per_s']:.1f} img/s, {flops / 1e12:.2f} TFLOP per "
            f"image, MFU {mfu} (of the card's dense bf16 peak), {100 * row['utilisation']:.0f}% of the "
            f"same-run {'fp32' if args.device == 'cpu' else 'bf16'} matmul"
        )
        profile = row.get("profile")
        if profile:
            total = profile["total_ms"]
            split = ", ".join(f"{group} {100 * ms / total:.0f}%" for group, ms in profile["groups_ms"].items())
            report.line(f"  profile split ({profile['clock']} self time): {split}")
            ops = " ".join(profile["top_ops_ms"])
            backend = next(
                (
                    name
                    for key, name in (
                        ("cudnn_attention", "cuDNN"),
                        ("flash", "flash"),
                        ("efficient", "memory-efficient"),
                        ("math", "math"),
                    )
                    if key in ops
                ),
                "unknown",
            )
            report.line(f"  SDPA backend: {backend}")


def check_compile(args, report: Report) -> None:
    """Check 4: compile time, graphs per transformer, speed and memory against eager (rows of check 1)."""
    started = time.perf_counter()
    rows = bench_rows(
        args,
        "gpu-check 1a b8 compiled",
        "--workloads",
        "1a",
        "--batch",
        "8",
        "--checkpointing",
        args.checkpointing,
        "--compile",
    )
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    graphs = {
        cls.__name__: len(_debug_get_cache_entry_list(cls.forward.__code__))
        for cls in (EncoderTransformer, DecoderTransformer)
    }
    report.line(
        f"compile: {time.perf_counter() - started:.0f} s for the run with compilation, graphs {graphs}, "
        f"{rows[0]['ms']:.0f} ms per step, peak {rows[0]['peak_mem_mb'] / 1024:.1f} GiB (eager: the b8 row)"
        if rows[0].get("peak_mem_mb")
        else f"compile: {rows[0]['ms']:.0f} ms per step, graphs {graphs}"
    )


def check_host_syncs(args, report: Report) -> None:
    """Check 2: every synchronising call inside a training step (forward, backward, guard, Adam, projection, EMA)."""
    if args.device == "cpu" or not torch.cuda.is_available():
        report.line("host syncs: not measured (needs CUDA)")
        return
    device = torch.device(args.device)
    bundle = build_bundle(args.preset, device, build_feature_nets("random", device), None, "random", args.checkpointing)
    bundle.attach_update(device)
    images = make_images(bundle, 2, device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        optimizer_step(bundle, images, "1a")  # warm-up: lazy state, cuDNN / flash choices
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                optimizer_step(bundle, images, "1a")
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    report.line(f"host syncs in one 1a step: {len(syncs)}" + (f" ({syncs[:3]})" if syncs else ""))


def check_stage_1b_and_decode(args, report: Report) -> None:
    """Check 3: Stage 1B memory and ms, decode ms per image."""
    row = bench_rows(args, "gpu-check 1b b4", "--workloads", "1b", "--batch", "4")[0]
    memory = f"{row['peak_mem_mb'] / 1024:.1f} GiB" if row.get("peak_mem_mb") else "n/a"
    report.line(f"1b micro-batch 4: {row['ms']:.0f} ms per step, peak {memory}")
    for sampler in ("paper", "fast"):
        for batch in (1, 32):
            row = bench_rows(
                args,
                f"gpu-check decode {sampler} b{batch}",
                "--workloads",
                "decode",
                "--batch",
                str(batch),
                "--sampler",
                sampler,
            )[0]
            report.line(f"decode {sampler} sampler, batch {batch}: {row['ms'] / batch:.1f} ms per image")


CHECKS = {
    "memory": check_memory_and_speed,
    "syncs": check_host_syncs,
    "1b-decode": check_stage_1b_and_decode,
    "compile": check_compile,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=tuple(CHECKS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="lo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpointing", default="every_4")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(args.out / "report.md", fresh=False)
    try:
        CHECKS[args.check](args, report)
    except Exception as error:  # one line in the report, not a traceback: the runner goes on with the next check
        report.line(f"{args.check}: failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
