"""Ablation grids as data: configs/ablations/<grid>.yaml -> fits, Stage-1B hand-offs, tests, a table.

    flowmo ablate grids                                  # the shipped grids and what each one asks
    flowmo ablate list tiny                              # its cells and their resolved overlays
    flowmo ablate run tiny --dry-run                     # every command, nothing runs
    flowmo ablate run tiny --jobs 2                      # train + evaluate here, two steps at once; the table
    flowmo ablate run paper-table4 --launcher slurm --nodes 2 --gpus-per-node 8 --partition gpu
    flowmo ablate table tiny                             # results/ablations/tiny/table.md, .csv + <metric>.png

A grid file names the config stack of its base, its axes and how cells are formed (the file format is
documented in configs/ablations/README.md). Every axis value is a small config overlay, inline or a file.
An axis has a kind:
- train: the value changes what is trained, so each distinct combination of train values is one fit;
- eval: the value only changes evaluation (sampler rho, CFG, steps): the cell tests the checkpoint of the
  cell with the same train values instead of training again;
- posttrain: the first value means "Stage 1A only"; any other runs Stage 1B (the grid's posttrain stack plus
  the value's overlay) starting from the same cell's Stage-1A checkpoint (EMA weights), so "1A only" and
  "1A + 1B" are two rows of one grid.
Cells are `one-at-a-time` (the paper's style: the base, then each non-base value alone) or `product` (every
combination of the listed axes, the others at their base value).

Replicates: `seeds: [0, 1, 2]` runs every fit once per seed (`--seed_everything`, `--model.seed`, `--data.seed`:
initialisation, data draw, training noise); each replicate is tested with the same evaluation noise, so the
table gives each metric's mean ± a 95% Student-t interval over seeds and each cell's difference from the base
paired by seed (flowmo.ablate.stats); a Stage-1B replicate starts from the same seed's Stage 1A.

Names: fits are runs/ablate-<grid>-<train values>[-<posttrain value>]-s<seed>, tests runs/ablate-<grid>-<cell>-s<seed>
and write results/ablate-<grid>-<cell>-s<seed>/metrics.json. Fits resume (`--ckpt_path last`); tests whose metrics
are newer than their checkpoint are skipped; each step's output goes to runs/<run>/<fit|test>.log and its wall
time to results/ablations/<grid>/timings.json. Tests load the EMA weights through `model.init.weights`, so the
configs alone decide the evaluation protocol.
"""

from __future__ import annotations

from flowmo.ablate.grid import Axis, Cell, Grid, Options, Value, available_grids, load_grid
from flowmo.ablate.launch import Slurm, execute, write_slurm
from flowmo.ablate.overlays import check_overlays, write_inline_overlays
from flowmo.ablate.plan import Step, plan
from flowmo.ablate.results import collect
from flowmo.ablate.table import write_results

__all__ = [
    "Axis",
    "Cell",
    "Grid",
    "Options",
    "Slurm",
    "Step",
    "Value",
    "available_grids",
    "check_overlays",
    "collect",
    "execute",
    "load_grid",
    "plan",
    "write_inline_overlays",
    "write_results",
    "write_slurm",
]
