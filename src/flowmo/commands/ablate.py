"""`flowmo ablate grids | list GRID | run GRID | table GRID`: ablation grids as data (flowmo.ablate has the format
and the usage examples)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time

from flowmo.errors import UserError


def parser(command: str = "ablate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowmo ablate", description="ablation grids (configs/ablations/*.yaml)")
    sub = parser.add_subparsers(dest="action", required=True)
    grids = sub.add_parser("grids", help="the grids in configs/ablations/")
    grids.add_argument("--config-dir", default="configs")
    listing = sub.add_parser("list", help="a grid's cells and their resolved overlays")
    run = sub.add_parser("run", help="fit + test a grid's cells, then write its table")
    table = sub.add_parser("table", help="write results/ablations/<grid>/table.{md,csv} and the PNGs")
    for sub_parser in (listing, run, table):
        sub_parser.add_argument("grid", help="a grid name (flowmo ablate grids) or a grid .yaml path")
    listing.add_argument("--dry-run", action="store_true", help="also print every command")
    run.add_argument("--cells", help="comma list of cell names (default: every cell)")
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    run.add_argument("--steps", type=int, help="trainer.max_steps of every Stage-1A fit (default: the grid's)")
    run.add_argument("--posttrain-steps", type=int, help="trainer.max_steps of every Stage-1B fit")
    run.add_argument("--gpus", type=int, help="devices per node for every command")
    run.add_argument("--nodes", type=int, default=1)
    run.add_argument(
        "--extra",
        action="append",
        default=[],
        help="arguments appended to every command, e.g. --extra='--data.num_workers 4' (repeatable)",
    )
    run.add_argument("--force", action="store_true", help="rerun tests whose metrics.json is current")
    run.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="fits / tests run at once here, the cores split evenly between them (default 1; at most the cores)",
    )
    run.add_argument("--max-cells", type=int, default=16, help="refuse larger grids unless --yes (default 16)")
    run.add_argument("--yes", action="store_true", help="run a grid larger than --max-cells")
    run.add_argument("--launcher", choices=("local", "slurm"), default="local")
    slurm = run.add_argument_group("slurm (with --launcher slurm)")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="per job, e.g. 48:00:00")
    slurm.add_argument("--account")
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--cpus-per-task", type=int)
    for sub_parser in (listing, run, table):
        sub_parser.add_argument("--config-dir", default="configs")
        sub_parser.add_argument("--runs-dir", default="runs")
        sub_parser.add_argument(
            "--results-dir", default="results", help="where tests write metrics.json (the eval configs' out_dir)"
        )
    return parser


def options_from(args: argparse.Namespace):
    from flowmo.ablate import Options  # here, not above: --help answers before torch and Lightning load

    extra = tuple(token for chunk in getattr(args, "extra", []) for token in shlex.split(chunk))
    gpus = getattr(args, "gpus", None)
    if getattr(args, "launcher", "local") == "slurm":
        gpus = args.gpus_per_node
    return Options(
        config_dir=args.config_dir,
        runs_dir=args.runs_dir,
        results_dir=args.results_dir,
        steps=getattr(args, "steps", None),
        posttrain_steps=getattr(args, "posttrain_steps", None),
        gpus=gpus,
        nodes=getattr(args, "nodes", 1),
        extra=extra,
    )


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UserError as error:
        print(f"flowmo ablate: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    # here, not above: --help answers before torch and Lightning load (the overlay check reads their signatures)
    from flowmo.ablate import (
        Slurm,
        available_grids,
        check_overlays,
        execute,
        load_grid,
        plan,
        write_inline_overlays,
        write_results,
        write_slurm,
    )
    from flowmo.ablate.grid import describe, select_cells
    from flowmo.ablate.launch import build_sample_set, check_jobs

    if args.action == "grids":
        for name in available_grids(args.config_dir):
            print(f"{name:16} {load_grid(name, args.config_dir).title}")
        return 0
    grid = load_grid(args.grid, args.config_dir)
    options = options_from(args)
    if args.action == "list":
        print(describe(grid))
        if args.dry_run:
            print("\n".join(f"# {s.key}\n{s.shell()}" for s in plan(grid, options)))
        return 0
    if args.action == "table":
        paths = write_results(grid, options)
        print(f"ablation table {grid.name}: " + ", ".join(str(p) for p in paths.values()))
        return 0
    if args.launcher == "local":
        check_jobs(args.jobs, options.gpus)
    cells = select_cells(grid, args.cells)
    if len(cells) > args.max_cells and not args.yes:
        raise UserError(
            f"grid {grid.name} has {len(cells)} cells, more than --max-cells {args.max_cells}; "
            "pass --yes to run them all, or --cells to pick some."
        )
    check_overlays(grid, args.config_dir)
    write_inline_overlays(grid, options)
    steps = plan(grid, options, cells)
    if args.launcher == "slurm":
        slurm = Slurm(
            partition=args.partition,
            time=args.time,
            gpus_per_node=args.gpus_per_node,
            nodes=args.nodes,
            cpus_per_task=args.cpus_per_task,
            account=args.account,
        )
        submit = write_slurm(grid, steps, options, slurm)
        if args.dry_run:
            print(f"wrote {len(steps)} sbatch scripts and {submit}; run it to submit.")
        else:
            subprocess.run(["bash", str(submit)], check=True)
        return 0
    if args.dry_run:
        print("\n".join(f"# {s.key}\n{s.shell()}" for s in steps))
        return 0
    build_sample_set(grid)
    started = time.time()
    try:
        failed = execute(grid, steps, options, force=args.force, jobs=args.jobs)
    except KeyboardInterrupt:
        print(
            "flowmo ablate: interrupted; run the same command again to resume (finished fits resume from their "
            "last checkpoint, current tests are skipped).",
            file=sys.stderr,
        )
        return 130
    paths = write_results(grid, options)
    print(
        f"ablation grid {grid.name}: {len(steps)} steps, --jobs {args.jobs}, in {(time.time() - started) / 60:.1f} "
        "min; " + ", ".join(str(p) for p in paths.values())
    )
    if failed:
        print(
            f"flowmo ablate: {len(failed)} step(s) failed and their cells' replicates are missing from the table; "
            "read their logs, fix the cause and run the same command again.",
            file=sys.stderr,
        )
        return 1
    return 0
