"""`make gpu-check`: what a FlowMo-Lo run on a cluster depends on, measured on one GPU in about eight minutes.

    python -m flowmo.bench.gpu_check [--out results/gpu-check] [--preset lo]

Its checks, in priority order (each is written as soon as it is measured, so a run cut short keeps what it had):
  1. peak allocated / reserved memory of a Stage-1A step at micro-batch 8 and 4 (the config's activation
     checkpointing), against `flowmo plan`'s prediction for the same setting;
  2. ms per step and MFU: FlowMo's FLOPs per image (counted) x images/s over the card's dense bf16 peak, and over a
     bf16 matmul timed in the same run;
  3. which SDPA backend runs, and attention's share of the step (from the profile);
  4. the profile split by operator group;
  5. torch.compile: compile time, graphs per transformer, speed-up and memory against eager;
  6. host synchronisations inside a training step (torch.cuda.set_sync_debug_mode);
  7. Stage 1B at micro-batch 4: memory and ms;
  8. decode ms per image at batch 1 and 32, paper and fast samplers.

Output: OUT/bench.json (the rows of `make bench`, label "gpu-check ...") and OUT/report.md (one line per check).
On a CPU (`--device cpu --preset tiny`) the same script runs end to end as a smoke test; the sync check needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from flowmo.bench import model as bench
from flowmo.bench.memory import plan
from flowmo.bench.workloads import build_bundle, build_feature_nets, make_images, optimizer_step
from flowmo.nn.transformer import DecoderTransformer, EncoderTransformer

DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # the vendors' dense bf16 peaks


class Report:
    def __init__(self, out: Path):
        self.path = out / "report.md"
        self.path.write_text("# gpu-check\n\n")

    def line(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as file:
            file.write(f"- {text}\n")


def bench_rows(args, label: str, *extra: str) -> list[dict]:
    """One `make bench` run; returns its rows (merged into OUT/bench.json, where each call's label is its own)."""
    json_path = args.out / "bench.json"
    bench.main(["--preset", args.preset, "--precision", "bf16", "--device", args.device, "--feature-nets", "random",
                "--warmup", str(args.warmup), "--iters", str(args.iters), "--json", str(json_path),
                "--label", label, *extra])
    return [row for row in json.loads(json_path.read_text()) if row["label"] == label]


def peak_tflops(device: str) -> float | None:
    if not torch.cuda.is_available() or device == "cpu":
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in DENSE_BF16_TFLOPS.items() if key in name), None)


def check_memory_and_speed(args, report: Report) -> None:
    """Checks 1-4: memory against the plan, ms and MFU, the SDPA backend and the profile split."""
    for batch in (8, 4):
        rows = bench_rows(args, f"gpu-check 1a b{batch}", "--workloads", "1a", "--batch", str(batch),
                          "--checkpointing", args.checkpointing, *(["--profile"] if batch == 8 else []))
        row = rows[0]
        predicted = plan(args.preset, "1a", batch, "bf16-mixed", args.checkpointing, ranks=1).total_gib
        reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
        report.line(f"1a micro-batch {batch} ({args.checkpointing}): peak allocated {row['peak_mem_mb'] / 1024:.1f} "
                    f"GiB" if row.get("peak_mem_mb") else f"1a micro-batch {batch}: peak n/a")
        report.line(f"  planner (1 rank, no DDP buckets) {predicted:.1f} GiB; reserved "
                    f"{'n/a' if reserved is None else f'{reserved:.1f} GiB'}")
        peak = peak_tflops(args.device)
        flops = row["model_flops"] / row["batch"]
        mfu = "n/a" if peak is None else f"{100 * row['images_per_s'] * flops / (peak * 1e12):.1f}%"
        report.line(f"  {row['ms']:.0f} ms per step, {row['images_per_s']:.1f} img/s, {flops / 1e12:.2f} TFLOP per "
                    f"image, MFU {mfu} (of the card's dense bf16 peak), {100 * row['utilisation']:.0f}% of the "
                    "same-run bf16 matmul")
        profile = row.get("profile")
        if profile:
            total = profile["total_ms"]
            split = ", ".join(f"{group} {100 * ms / total:.0f}%" for group, ms in profile["groups_ms"].items())
            report.line(f"  profile split ({profile['clock']} self time): {split}")
            ops = " ".join(profile["top_ops_ms"])
            backend = next((name for key, name in (("cudnn_attention", "cuDNN"), ("flash", "flash"),
                                                   ("efficient", "memory-efficient"), ("math", "math"))
                            if key in ops), "unknown")
            report.line(f"  SDPA backend: {backend}")


def check_compile(args, report: Report) -> None:
    """Check 5: compile time, graphs per transformer, speed and memory against eager (rows of check 1)."""
    started = time.perf_counter()
    rows = bench_rows(args, "gpu-check 1a b8 compiled", "--workloads", "1a", "--batch", "8", "--checkpointing",
                      args.checkpointing, "--compile")
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    graphs = {cls.__name__: len(_debug_get_cache_entry_list(cls.forward.__code__))
              for cls in (EncoderTransformer, DecoderTransformer)}
    report.line(f"compile: {time.perf_counter() - started:.0f} s for the run with compilation, graphs {graphs}, "
                f"{rows[0]['ms']:.0f} ms per step, peak {rows[0]['peak_mem_mb'] / 1024:.1f} GiB (eager: the b8 row)"
                if rows[0].get("peak_mem_mb") else f"compile: {rows[0]['ms']:.0f} ms per step, graphs {graphs}")


def check_host_syncs(args, report: Report) -> None:
    """Check 6: every synchronising call inside a training step (forward, backward, guard, Adam, projection, EMA)."""
    if args.device == "cpu" or not torch.cuda.is_available():
        report.line("host syncs: not measured (needs CUDA)")
        return
    device = torch.device(args.device)
    bundle = build_bundle(args.preset, device, build_feature_nets("random", device), None, "random", args.checkpointing)
    bundle.attach_update(device)
    images = make_images(bundle, 2, device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        optimizer_step(bundle, images, bundle.recipes["1a"])  # warm-up: lazy state, cuDNN / flash choices
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                optimizer_step(bundle, images, bundle.recipes["1a"])
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    report.line(f"host syncs in one 1a step: {len(syncs)}" + (f" ({syncs[:3]})" if syncs else ""))


def check_stage_1b_and_decode(args, report: Report) -> None:
    """Checks 7 and 8."""
    row = bench_rows(args, "gpu-check 1b b4", "--workloads", "1b", "--batch", "4")[0]
    memory = f"{row['peak_mem_mb'] / 1024:.1f} GiB" if row.get("peak_mem_mb") else "n/a"
    report.line(f"1b micro-batch 4: {row['ms']:.0f} ms per step, peak {memory}")
    for sampler in ("paper", "fast"):
        for batch in (1, 32):
            row = bench_rows(args, f"gpu-check decode {sampler} b{batch}", "--workloads", "decode", "--batch",
                             str(batch), "--sampler", sampler)[0]
            report.line(f"decode {sampler} sampler, batch {batch}: {row['ms'] / batch:.1f} ms per image")


CHECKS = {"memory": check_memory_and_speed, "compile": check_compile, "syncs": check_host_syncs,
          "1b-decode": check_stage_1b_and_decode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    parser.add_argument("--preset", default="lo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpointing", default="every_4", help="as configs/model/lo.yaml")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=tuple(CHECKS), help="checks not to run")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="no check starts after this many seconds (a lent GPU's minutes are few; the later "
                             "checks are the less important ones)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    report.line(f"{bench.describe_device(torch.device(args.device))}, torch {torch.__version__}, preset {args.preset}")
    started = time.perf_counter()
    for name, check in CHECKS.items():
        if name in args.skip:
            continue
        if time.perf_counter() - started > args.budget_s:
            report.line(f"{name}: not run (past the {args.budget_s:.0f} s budget)")
            continue
        try:
            check(args, report)
        except Exception as error:  # one failed check must not cost the others their minutes on the card
            report.line(f"{name}: failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
    print(f"wrote {args.out / 'report.md'} and {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
