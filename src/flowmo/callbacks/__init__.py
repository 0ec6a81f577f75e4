"""Lightning callbacks: throughput figures, reconstruction grids, evaluation reports."""

from flowmo.callbacks.images import ReconstructionGrid
from flowmo.callbacks.throughput import Throughput

__all__ = ["ReconstructionGrid", "Throughput"]
