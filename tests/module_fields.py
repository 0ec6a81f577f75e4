"""Tests build FlowMoModule from a few single fields: `module_with(lr=1e-3, perceptual="none")` hands each field to
the settings group that has it (loss, optim, init or eval) and the rest to the constructor as they are."""

from __future__ import annotations

import dataclasses

from flowmo.losses import LossRecipe
from flowmo.module import FlowMoModule
from flowmo.settings import EvalSettings, InitSettings, OptimSettings

GROUPS = {"loss": LossRecipe, "optim": OptimSettings, "init": InitSettings, "eval": EvalSettings}


def grouped(**fields) -> dict:
    """Constructor arguments: each group's fields gathered into that group's dataclass."""
    arguments: dict = {}
    chosen: dict[str, dict] = {name: {} for name in GROUPS}
    for key, value in fields.items():
        group = next((g for g, cls in GROUPS.items() if key in {f.name for f in dataclasses.fields(cls)}), None)
        if group is None:
            arguments[key] = value
        else:
            chosen[group][key] = value
    return {**arguments, **{g: GROUPS[g](**values) for g, values in chosen.items() if values}}


def module_with(cls: type[FlowMoModule] = FlowMoModule, **fields) -> FlowMoModule:
    return cls(**grouped(**fields))
