"""RunLogger: the TensorBoard logger of every `flowmo fit | validate | test`, without Lightning's noise.

    runs/<run_name>/version_N/   fit: one folder per start, as Lightning names them
    runs/<run_name>/validate/    flowmo validate, logged at the evaluated checkpoint's optimizer step
    runs/<run_name>/test/        flowmo test, likewise

Lightning's TensorBoardLogger adds an `hp_metric` placeholder (-1, never updated) and an `epoch` scalar to every
write; FlowMo trains on an infinite stream where epochs mean nothing, so both only clutter TensorBoard.
"""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger

EVALUATION_FOLDERS = ("validate", "test")


class RunLogger(TensorBoardLogger):
    def __init__(self, save_dir: str, name: str, subcommand: str | None = None) -> None:
        version = subcommand if subcommand in EVALUATION_FOLDERS else None
        super().__init__(save_dir=save_dir, name=name, version=version, default_hp_metric=False)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        super().log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step)
