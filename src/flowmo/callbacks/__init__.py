"""Lightning callbacks: throughput figures, reconstruction grids, evaluation reports, skipped-sample counts,
checkpoint retention."""

from flowmo.callbacks.images import ReconstructionGrid
from flowmo.callbacks.progress import StepProgressBar
from flowmo.callbacks.report import EvaluationReport
from flowmo.callbacks.retention import BestRfidCheckpoint, CheckpointRetention
from flowmo.callbacks.skipped import SkippedSamples
from flowmo.callbacks.throughput import Throughput

__all__ = [
    "BestRfidCheckpoint",
    "CheckpointRetention",
    "EvaluationReport",
    "ReconstructionGrid",
    "SkippedSamples",
    "StepProgressBar",
    "Throughput",
]
