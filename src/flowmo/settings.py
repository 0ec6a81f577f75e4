"""The typed groups of settings FlowMoModule takes besides the architecture and the loss recipe (losses.LossRecipe).

    --model.optim.lr 5e-5  --model.init.weights lo  --model.eval.sampler.steps 8  --model.loss.sample_weight 0.01

LightningCLI parses each group as a nested dataclass; configs/stage/*.yaml hold the paper's values of each. The
module stores them in its hyper-parameters as plain dicts, so a checkpoint stays loadable weights-only. Checkpoints
written before the groups existed held the same fields flat: `group_hparams` reads both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from flowmo.errors import UserError
from flowmo.flow import SamplerSettings

LR_SCHEDULES = ("constant", "cosine")
INIT_SOURCES = ("ema", "raw")
INIT_PARTS = ("all", "encoder")


@dataclass(frozen=True)
class OptimSettings:
    """The optimisation of both stages (method §5): Adam, its schedule, the weight-norm projection, the EMA, the
    encoder freeze and the non-finite guard's patience.

    lr: Adam's learning rate (paper: 1e-4 in 1A, 5e-5 in 1B).
    lr_schedule: constant (paper) or cosine (anneals to 0 at trainer.max_steps).
    betas, adam_eps: Adam's (paper: 0.9, 0.95; 1e-8); no weight decay.
    weight_norm_projection: keep each block weight matrix at its initial norm after every step (paper).
    ema_decay, ema_every: the EMA's decay per update and the optimizer steps between updates (paper 0.9999, 10).
    ema_warmup: cap update n's decay at (1 + n) / (20 + n) (optim.ModelEMA), so a short run's EMA is not its random
        initialisation; off where the EMA starts from trained weights (Stage 1B).
    freeze_encoder_after: optimizer step after which Stage 1A freezes the encoder (paper 200k; None = never).
    reset_optimizer_on_freeze: restart Adam's moments at the freeze (the authors rebuild the optimizer).
    max_nonfinite_steps: a step with a non-finite loss or gradient is skipped and counted; this many in a row stop
        the run.
    """

    lr: float = 1e-4
    lr_schedule: str = "constant"
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    weight_norm_projection: bool = True
    ema_decay: float = 0.9999
    ema_every: int = 10
    ema_warmup: bool = True
    freeze_encoder_after: int | None = 200_000
    reset_optimizer_on_freeze: bool = True
    max_nonfinite_steps: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"model.optim.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}.")


@dataclass(frozen=True)
class InitSettings:
    """Where training starts: fresh weights, or `weights` (a .ckpt, an exported .pt, an official .pth, or a
    released name: lo, hi). Stage 1B starts from a Stage-1A file.

    weights_from: the ema or raw weights of that file.
    parts: "all" loads the whole tokenizer; "encoder" only the encoder under a fresh decoder (with
        optim.freeze_encoder_after 0: Table 4's "MSE-pretrained encoder, then frozen" cell).
    """

    weights: str | None = None
    weights_from: str = "ema"
    parts: str = "all"

    def __post_init__(self) -> None:
        if self.weights_from not in INIT_SOURCES:
            raise UserError(f"model.init.weights_from must be one of {INIT_SOURCES}, got {self.weights_from!r}.")
        if self.parts not in INIT_PARTS or (self.parts != "all" and not self.weights):
            raise UserError(
                f"model.init.parts must be one of {INIT_PARTS} and 'encoder' needs model.init.weights; "
                f"got {self.parts!r} with weights={self.weights!r}."
            )

    @property
    def whole_model(self) -> bool:
        """Whether trained weights fill the whole tokenizer (and its EMA starts from them)."""
        return bool(self.weights) and self.parts == "all"


@dataclass(frozen=True)
class EvalSettings:
    """How validation and test decode and what they measure (method §7).

    sampler: flow.SamplerSettings, the paper's by default; one field: --model.eval.sampler.steps 8.
    use_ema: evaluate the EMA weights (paper) rather than the raw ones.
    lpips_nets: LPIPS variants to compute: alex and/or vgg.
    rfid: compute rFID (needs the Inception weights).
    inception_path: the pt_inception-2015-12-05 file (default: found like the other feature nets).
    """

    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    use_ema: bool = True
    lpips_nets: tuple[str, ...] = ()
    rfid: bool = False
    inception_path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", as_group(SamplerSettings, self.sampler))
        object.__setattr__(self, "lpips_nets", tuple(self.lpips_nets))


Group = TypeVar("Group")


def as_group(cls: type[Group], value: Group | Mapping[str, Any] | None) -> Group:
    """A group from what LightningCLI, a test or a checkpoint hands over: the dataclass itself, a dict, or None."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return cls(**dict(value))


def plain(group: Any) -> dict[str, Any]:
    """A group as plain values (tuples as lists) for the checkpoint's hyper-parameters and config.yaml."""
    values = asdict(group)

    def lists(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: lists(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    return lists(values)


# Where each field lived before the groups (checkpoints written then hold them flat in their hyper-parameters).
FLAT_NAMES = {
    "optim": {f.name: f.name for f in fields(OptimSettings)},
    "init": {"weights": "init_weights", "weights_from": "init_weights_from", "parts": "init_weights_parts"},
}


def group_hparams(hparams: Mapping[str, Any], group: str) -> dict[str, Any]:
    """One group's fields from a checkpoint's hyper-parameters, grouped (now) or flat (before the groups); the
    fields the file does not hold are absent."""
    if isinstance(hparams.get(group), Mapping):
        return dict(hparams[group])
    return {name: hparams[flat] for name, flat in FLAT_NAMES.get(group, {}).items() if flat in hparams}
