"""Replicate statistics for ablation tables: a metric's mean over seeds with a 95% Student-t interval, and a
cell's difference from the base paired by seed (the evaluation noise is fixed per image, so the seed is what
varies between replicates). A replicate that failed is missing: it is counted, never averaged as if present.
flowmo.ablate.results builds every row of the table from these two functions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Estimate:
    mean: float | None
    half_width: float | None  # of the interval; None with fewer than 2 values
    n: int  # values present
    missing: int = 0  # replicates asked for but absent (failed runs)

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.mean is None or self.half_width is None:
            return None
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0 (a difference the replicates support)."""
        interval = self.interval
        return interval is not None and (interval[0] > 0 or interval[1] < 0)

    def format(self, digits: int = 2, signed: bool = False, mark: str = "") -> str:
        """ "mean ± half-width", "(n of m)" when replicates are missing; signed: a difference, with `mark`
        after it where its interval excludes 0."""
        if self.mean is None:
            return "missing"
        text = f"{self.mean:{'+' if signed else ''}.{digits}f}"
        if self.half_width is not None:
            text += f" ± {self.half_width:.{digits}f}" + (f" {mark}" if mark and self.excludes_zero else "")
        return text + (f" ({self.n} of {self.n + self.missing})" if self.missing else "")


def _present(values: Iterable[float | None]) -> tuple[list[float], int]:
    values = list(values)
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return present, len(values) - len(present)


def mean_interval(values: Iterable[float | None], confidence: float = 0.95) -> Estimate:
    """Mean and the Student-t interval over the values present (sample standard deviation, n - 1 degrees)."""
    present, missing = _present(values)
    n = len(present)
    if n == 0:
        return Estimate(None, None, 0, missing)
    mean = sum(present) / n
    if n < 2:
        return Estimate(mean, None, 1, missing)
    sd = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1))
    return Estimate(mean, stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n), n, missing)


def paired_difference(
    cell: Mapping[int, float | None], base: Mapping[int, float | None], confidence: float = 0.95
) -> Estimate:
    """cell - base, seed by seed, over the seeds both have; a seed either lacks counts as missing."""
    seeds = sorted(set(cell) | set(base))
    differences = [None if cell.get(s) is None or base.get(s) is None else cell[s] - base[s] for s in seeds]
    return mean_interval(differences, confidence)
