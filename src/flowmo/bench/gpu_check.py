"""`make gpu-check`: what a FlowMo-Lo run on a cluster depends on, measured on one GPU in under nine minutes.

    python -m flowmo.bench.gpu_check [--out results/gpu-check] [--preset lo] [--budget-s 480]

A preflight first (seconds): the device, bf16 on it, and every package the checks import; anything missing stops the
command with one sentence naming it and how to bring it (`make wheels` where PyPI is reachable). Then the checks, each
in a process of its own with a deadline at which it is stopped, so a hung kernel or a slow compile costs only its own
minutes; compile, the longest and least proven, runs last:
  1. memory: peak allocated / reserved memory of a Stage-1A step at micro-batch 8 and 4 (the config's activation
     checkpointing) against `flowmo plan`'s prediction; ms per step and MFU (FlowMo's counted FLOPs per image x
     images/s over the card's dense bf16 peak, and over a bf16 matmul timed in the same run); the SDPA backend and
     the profile split by operator group;
  2. syncs: host synchronisations inside a training step (torch.cuda.set_sync_debug_mode);
  3. 1b-decode: Stage 1B at micro-batch 4 (memory and ms); decode ms per image at batch 1 and 32, both samplers;
  4. compile: torch.compile time, graphs per transformer, speed-up and memory against eager.

Output: OUT/report.md (one line per finding, written as each is measured, so a check stopped at its deadline keeps
what it had) and OUT/bench.json (the rows of `make bench`, label "gpu-check ..."). Exit status 0 when every check ran
and passed, 1 when one failed or was stopped, 2 when the preflight failed. On a CPU (`--device cpu --preset tiny`)
the same script runs as a smoke test; the sync check needs CUDA.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

# What the checks import beyond torch: import name -> the distribution that brings it.
NEEDED = {
    "lightning": "lightning",
    "torchmetrics": "torchmetrics",
    "torchvision": "torchvision",
    "timm": "timm",
    "lpips": "lpips",
    "pytorch_fid": "pytorch-fid",
    "einops": "einops",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "webdataset": "webdataset",
    "jsonargparse": "jsonargparse",
    "omegaconf": "omegaconf",
    "scipy": "scipy",
    "PIL": "pillow",
}
HOW_TO_BRING = (
    "on a machine with PyPI run `make wheels`, copy wheels/ beside this checkout and rerun with "
    "WHEELS=wheels (docs/install.md, air-gapped clusters)"
)
# The longest each check may take, in run order; a check also stops when the whole budget is spent.
DEADLINES_S = {"memory": 240, "syncs": 90, "1b-decode": 150, "compile": 240}
MIN_START_S = 20  # a check with less than this left is reported as not run rather than started to be cut


class Report:
    """OUT/report.md; the runner starts it, each check appends its own lines (flowmo.bench.gpu_checks)."""

    def __init__(self, path: Path, fresh: bool = True):
        self.path = path
        if fresh:
            path.write_text("# gpu-check\n\n")

    def line(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as file:
            file.write(f"- {text}\n")


# ------------------------------------------------------------------------------------------- preflight
def missing_packages() -> list[str]:
    """ "name" or "name (error)" for each of NEEDED this interpreter cannot import (all tried, so all are named)."""
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name if NEEDED[name] == name else f"{name} (from {NEEDED[name]})")
        except Exception as error:  # installed but broken, e.g. built for another torch: name it, no traceback
            missing.append(f"{name} ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
    return missing


# Run in a process of its own: a CUDA context made here would hold ~0.5 GB of the card through every check.
DEVICE_PROBE = """
import sys, torch
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); run on a GPU node")
a = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
(a @ a).sum().tolist()
if device.startswith("cuda"):
    card = torch.cuda.get_device_properties(device)
    print(f"{card.name} ({card.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
else:
    print(f"CPU, {torch.get_num_threads()} threads")
"""


def probe_device(device: str) -> tuple[bool, str]:
    """(True, what the device is) when a bf16 matmul runs on it; (False, why not) otherwise."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", DEVICE_PROBE, device], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False, f"a bf16 matmul on {device} did not finish within 120 s"
    said = (result.stdout + result.stderr).strip().splitlines() or ["no output"]
    return result.returncode == 0, said[-1]


def preflight(args, report: Report) -> bool:
    missing = missing_packages()
    if missing:
        report.line(f"preflight: failed: {sys.executable} cannot import {', '.join(missing)}; {HOW_TO_BRING}.")
        return False
    works, said = probe_device(args.device)
    if not works:
        report.line(f"preflight: failed: {said}.")
        return False
    report.line(
        f"preflight: {said}, torch {torch.__version__}, {sys.executable}, preset {args.preset}, bf16 ok, "
        "every package importable"
    )
    return True


# ------------------------------------------------------------------------------------------- the runner
def child_argv(args, name: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flowmo.bench.gpu_checks",
        name,
        "--out",
        str(args.out),
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--checkpointing",
        args.checkpointing,
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
    ]


def run_with_deadline(argv: list[str], seconds: float) -> int | None:
    """The exit status of `argv`, or None when it was stopped at the deadline (its whole process group, so compile
    workers go too)."""
    process = subprocess.Popen(argv, start_new_session=True)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None
    except BaseException:  # Ctrl-C or a SIGTERM of the parent: no orphan keeps the card
        os.killpg(process.pid, signal.SIGKILL)
        raise


def run_checks(args, report: Report) -> list[str]:
    """Each check not skipped, in order, within its deadline and the budget; returns the ones that did not pass."""
    budget_end = time.monotonic() + args.budget_s
    not_passed = []
    for name, deadline in DEADLINES_S.items():
        if name in args.skip:
            continue
        left = budget_end - time.monotonic()
        seconds = min(deadline, left)
        if left < MIN_START_S:
            report.line(f"{name}: not run ({args.budget_s:.0f} s budget spent)")
            not_passed.append(name)
            continue
        status = run_with_deadline(child_argv(args, name), seconds)
        if status is None:
            report.line(f"{name}: stopped at its {seconds:.0f} s deadline (the lines above are what it measured)")
        elif status != 0:
            report.line(f"{name}: exited with status {status}")
        if status != 0:
            not_passed.append(name)
    return not_passed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    parser.add_argument("--preset", default="lo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpointing", default="every_4", help="as configs/model/lo.yaml")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=tuple(DEADLINES_S), help="checks not to run")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="the checks together stop after this many seconds (each also has its own deadline: "
        + ", ".join(f"{name} {s} s" for name, s in DEADLINES_S.items())
        + ")",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").unlink(missing_ok=True)  # this run's rows only, like report.md
    report = Report(args.out / "report.md")
    started = time.monotonic()
    if not preflight(args, report):
        return 2
    not_passed = run_checks(args, report)
    verdict = "every check passed" if not not_passed else f"did not pass: {', '.join(not_passed)}"
    report.line(f"done in {time.monotonic() - started:.0f} s; {verdict}")
    print(f"wrote {args.out / 'report.md'} and {args.out / 'bench.json'}")
    return 1 if not_passed else 0


if __name__ == "__main__":
    raise SystemExit(main())
