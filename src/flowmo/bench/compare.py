"""Time this tree's model code against another git revision's, alternating runs, and print the speed-ups.

    python -m flowmo.bench.compare --base 0953ad2 --preset cpu-mid --rounds 2

The base revision is checked out (detached) into a temporary git worktree; each side runs its own
scripts/bench_model.py with its own `flowmo` package (PYTHONPATH), so the rows compare what each revision's training
step and decode cost (revisions from before flowmo.bench carry the benchmark in that script). Runs alternate
before, after, before, after, ... so a machine that slows down part-way hurts both sides alike. Rows land in
bench.json labelled before-1, after-1, ...; the table compares the best median of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout: src/flowmo/bench/compare.py


def run_bench(src: Path, label: str, args: argparse.Namespace, json_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [
        sys.executable,
        str(src.parent / "scripts" / "bench_model.py"),
        "--preset",
        args.preset,
        "--batch",
        str(args.batch),
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--workloads",
        *args.workloads,
        "--label",
        label,
        "--json",
        str(json_path),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    print(f"--- {label}: {' '.join(command[1:])} (flowmo from {src})", flush=True)
    subprocess.run(command, env=env, check=True)


def best_medians(rows: list[dict], side: str) -> dict[str, float]:
    best: dict[str, float] = {}
    for row in rows:
        if row["label"].startswith(side + "-"):
            best[row["stage"]] = min(best.get(row["stage"], float("inf")), row["ms"])
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--base", required=True, help="git revision whose model code is 'before'")
    parser.add_argument("--preset", default="cpu-mid")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of both sides (default: torch's)")
    parser.add_argument("--workloads", nargs="+", default=["1a", "decode"])
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "bench" / "bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flowmo-base-") as folder:
        base = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True)
        try:
            for round_ in range(1, args.rounds + 1):
                run_bench(base / "src", f"before-{round_}", args, args.json)
                run_bench(ROOT / "src", f"after-{round_}", args, args.json)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    rows = [r for r in json.loads(args.json.read_text()) if r["preset"] == args.preset and r["batch"] == args.batch]
    before, after = best_medians(rows, "before"), best_medians(rows, "after")
    print(f"\n{args.preset}, batch {args.batch}: best median ms of {args.rounds} alternating rounds")
    print(f"{'stage':<8}{'before':>10}{'after':>10}{'speed-up':>10}")
    for stage in args.workloads:
        print(f"{stage:<8}{before[stage]:>10.1f}{after[stage]:>10.1f}{before[stage] / after[stage]:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
