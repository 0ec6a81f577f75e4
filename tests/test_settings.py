"""The typed settings groups FlowMoModule takes (flowmo.settings, losses.LossRecipe): built from what LightningCLI,
tests and checkpoints hand over, validated with one sentence, and read back from checkpoints of either layout."""

from __future__ import annotations

import pytest

from flowmo.errors import UserError
from flowmo.flow import SamplerSettings
from flowmo.losses import LossRecipe
from flowmo.optim import weights_record
from flowmo.settings import EvalSettings, InitSettings, OptimSettings, as_group, group_hparams, plain


def test_a_group_comes_from_itself_a_dict_or_nothing():
    assert as_group(OptimSettings, None) == OptimSettings()
    assert as_group(OptimSettings, {"lr": 5e-5, "betas": [0.9, 0.95]}) == OptimSettings(lr=5e-5)
    settings = EvalSettings(sampler={"steps": 8}, lpips_nets=["alex"])
    assert settings.sampler == SamplerSettings(steps=8) and settings.lpips_nets == ("alex",)
    assert as_group(EvalSettings, plain(settings)) == settings  # what a checkpoint's hyper-parameters hold


def test_bad_values_are_one_sentence_naming_the_field():
    with pytest.raises(UserError, match="model.optim.lr_schedule must be one of"):
        OptimSettings(lr_schedule="linear")
    with pytest.raises(UserError, match="'encoder' needs model.init.weights"):
        InitSettings(parts="encoder")
    with pytest.raises(UserError, match="model.init.weights_from must be one of"):
        InitSettings(weights="lo", weights_from="best")


def test_checkpoints_of_either_layout_give_the_same_record():
    """Checkpoints written before the groups held the same fields flat: both give the same EMA record."""
    grouped = {
        "optim": plain(OptimSettings(ema_decay=0.99, ema_every=1, ema_warmup=True)),
        "init": plain(InitSettings()),
        "loss": plain(LossRecipe()),
    }
    flat = {"ema_decay": 0.99, "ema_every": 1, "ema_warmup": True, "init_weights": None, "lr": 1e-4}
    assert group_hparams(flat, "optim") == {"ema_decay": 0.99, "ema_every": 1, "ema_warmup": True, "lr": 1e-4}
    assert group_hparams(flat, "init") == {"weights": None}
    assert weights_record("ema", grouped, 30) == weights_record("ema", flat, 30)
    assert weights_record("ema", grouped, 30)["ema_updates"] == 30
    assert weights_record("ema", {}, 30)["ema_updates"] is None  # a release: its file does not say
