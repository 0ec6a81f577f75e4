"""Stage 1A / 1B training on the tiny preset (CPU, fp32): recipes, freezing, projection, EMA, hand-off, resume."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from flowmo.flow import SamplerSettings
from flowmo.losses import LossRecipe, flowmo_loss
from flowmo.module import FlowMoModule
from flowmo.optim import ModelEMA
from module_fields import module_with

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")


class FixedImages(Dataset):
    """A few fixed images (seeded), as {"image"} dicts like the DataModule yields."""

    def __init__(self, count: int = 8, size: int = 32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        base = torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1
        ramp = torch.linspace(-0.5, 0.5, size)
        self.images = (
            base + 0.3 * ramp[None, None, :, None] + 0.1 * torch.randn(count, 3, size, size, generator=generator)
        ).clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index]}


def loader(count=8, batch=4) -> DataLoader:
    return DataLoader(FixedImages(count), batch_size=batch, shuffle=False)


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        deterministic=True,
    )
    return L.Trainer(max_steps=max_steps, **{**defaults, **kwargs})


def module(**kwargs) -> FlowMoModule:
    defaults = dict(
        preset="tiny", perceptual="none", feature_weights="random", sampler=SamplerSettings(steps=2), seed=0
    )
    return module_with(**{**defaults, **kwargs})


def save_1a(tmp_path, **kwargs) -> str:
    model = module(**kwargs)
    run = trainer(2)
    run.fit(model, loader())
    path = tmp_path / "stage1a.ckpt"
    run.save_checkpoint(path)
    return str(path)


def test_fast_dev_run_stage_1a_with_perceptual_loss():
    model = module(perceptual="lpips_vgg", lpips_nets=())
    trainer(1, fast_dev_run=True).fit(model, loader(), loader())
    assert model.perceptual_net is not None and model.perceptual_net.is_stand_in
    assert "LPIPS" in " ".join(model.stand_ins)


def test_fast_dev_run_stage_1b_through_the_chain(tmp_path):
    model = module(stage="1b", weights=save_1a(tmp_path), sample_loss="resnet50_logits")
    trainer(1, fast_dev_run=True).fit(model, loader(), loader())
    assert model.sample_net is not None and model.recipe.sample_weight == 0.01


def test_stage_1b_with_the_pixel_sample_loss(tmp_path):
    model = module(stage="1b", weights=save_1a(tmp_path), sample_loss="pixel_mse", sample_weight=1.0)
    trainer(1, fast_dev_run=True).fit(model, loader(), loader())
    assert model.sample_net.name == "pixel MSE" and model.stand_ins == []


def test_cosine_lr_schedule_anneals_to_zero_at_max_steps():
    model = module(lr=1e-3, lr_schedule="cosine")
    run = trainer(4)
    run.fit(model, loader())
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        module(lr_schedule="step")


def test_stage_1b_requires_stage_1a_weights():
    with pytest.raises(ValueError, match="Stage 1B starts from Stage-1A weights"):
        module(stage="1b")


def test_overfitting_a_few_images_lowers_the_flow_loss():
    torch.manual_seed(0)
    model = module(lr=2e-3, cfg_dropout=0.0)
    data = FixedImages(4).images

    def fixed_flow_loss() -> float:
        generator = torch.Generator().manual_seed(123)
        recipe = LossRecipe(perceptual_weight=0.0, cfg_dropout=0.0)
        with torch.no_grad():
            losses = [flowmo_loss(model.tokenizer, data, recipe, generator=generator).parts["flow"] for _ in range(8)]
        return float(torch.stack(losses).mean())

    before = fixed_flow_loss()
    trainer(60).fit(model, loader(4, 4))
    after = fixed_flow_loss()
    assert after < 0.6 * before, (before, after)


def test_stage_1b_trains_the_decoder_only(tmp_path):
    model = module(stage="1b", weights=save_1a(tmp_path), sample_loss="resnet50_logits", lr=1e-3)
    encoder_before = {k: v.clone() for k, v in model.tokenizer.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.tokenizer.decoder.state_dict().items()}
    trainer(3).fit(model, loader())
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.tokenizer.encoder.state_dict().items())
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.tokenizer.decoder.state_dict().items())
    optimizer = model.trainer.optimizers[0]
    assert [group["name"] for group in optimizer.param_groups] == ["decoder"]


def test_encoder_freezes_after_the_configured_step_and_adam_restarts():
    model = module(freeze_encoder_after=3, lr=1e-3)
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(pl_module.tokenizer.encoder.img_in.weight.detach().clone())
            if trainer.global_step == 4:  # the first step after the freeze
                steps = [s["step"] for s in trainer.optimizers[0].state.values()]
                assert steps and max(float(s) for s in steps) == 1.0  # moments restarted at the freeze

    trainer(6, callbacks=[Snapshot()]).fit(model, loader())
    assert not torch.equal(snapshots[0], snapshots[2])
    assert all(torch.equal(snapshots[2], s) for s in snapshots[3:])
    assert not any(p.requires_grad for p in model.tokenizer.encoder.parameters())


def test_weight_norm_projection_holds_the_initial_norms():
    model = module(lr=5e-3)
    names = model.weight_projection.names
    assert any(".img.attn.qkv" in n for n in names) and any(".txt.mod.lin" in n for n in names)
    assert all(".double_blocks." in f".{n}" for n in names)
    initial = {n: model.tokenizer.get_submodule(n).weight.detach().norm().item() for n in names}
    first_weight = model.tokenizer.get_submodule(names[0]).weight.detach().clone()
    trainer(4).fit(model, loader())
    for name in names:
        assert model.tokenizer.get_submodule(name).weight.norm().item() == pytest.approx(initial[name], rel=1e-5)
    assert not torch.equal(first_weight, model.tokenizer.get_submodule(names[0]).weight)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_matches_its_formula(warmup):
    """The paper's update (decay**every) without the warm-up; with it, the first update's decay is 1/20."""
    model = module(ema_decay=0.99, ema_every=5, lr=1e-3, ema_warmup=warmup)
    initial = {k: v.clone() for k, v in model.tokenizer.state_dict().items()}
    trainer(5).fit(model, loader())
    rate = 1 - (0.05 if warmup else 0.99**5)
    for name, value in model.tokenizer.state_dict().items():
        expected = (1 - rate) * initial[name] + rate * value
        assert torch.allclose(model.ema.module.state_dict()[name], expected, atol=1e-6), name


def test_ema_warmup_ends_at_the_papers_decay_and_is_off_from_trained_weights(tmp_path):
    ema = ModelEMA(torch.nn.Linear(2, 2), decay=0.9999, every=10, warmup=True)
    assert ema.update_decay(0) == 0.05 and ema.update_decay(18980) < 0.9999**10
    assert ema.update_decay(19000) == ema.update_decay(10**6) == 0.9999**10  # the paper's steady state
    assert ema.initial_share(20) < 1e-6 and ModelEMA(torch.nn.Linear(2, 2)).initial_share(20) > 0.98  # paper: noise
    assert module().ema.warmup and not module(ema_warmup=False).ema.warmup
    stage_1a = save_1a(tmp_path)
    stage_1b = module(stage="1b", weights=stage_1a, sample_loss="none")
    assert not stage_1b.ema.warmup  # Stage 1B's EMA starts from 1A's weights, as the authors' does
    saved = torch.load(stage_1a, weights_only=True)
    assert FlowMoModule.load_from_checkpoint(stage_1a, weights_only=True).ema.warmup
    del saved["hyper_parameters"]["optim"][
        "ema_warmup"
    ]  # a checkpoint from before the warm-up: its EMA goes on without
    torch.save(saved, tmp_path / "old.ckpt")
    assert not FlowMoModule.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True).ema.warmup


def test_ema_unit_update_and_reset():
    source = torch.nn.Linear(3, 2)
    ema = ModelEMA(source, decay=0.9, every=2)
    with torch.no_grad():
        source.weight.add_(1.0)
    ema.update(source)
    start = source.weight.detach() - 1.0
    assert torch.allclose(ema.module.weight, 0.81 * start + 0.19 * source.weight.detach())
    ema.reset(source)
    assert torch.equal(ema.module.weight, source.weight.detach())
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_stage_1a_to_1b_hand_off_loads_the_chosen_weights(tmp_path, which):
    path = save_1a(tmp_path, ema_every=1, lr=1e-2)
    checkpoint = torch.load(path, weights_only=False)
    prefix = "ema.module." if which == "ema" else "tokenizer."
    expected = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model = module(stage="1b", weights=path, weights_from=which, sample_loss="none")
    for name, value in model.tokenizer.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # the 1B EMA starts from the loaded weights
    assert all(torch.equal(v, model.tokenizer.state_dict()[k]) for k, v in model.ema.module.state_dict().items())
    raw = {k[len("tokenizer.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("tokenizer.")}
    assert any(not torch.equal(raw[k], expected[k]) for k in raw) or which == "raw"


def _state(model: FlowMoModule) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    optimizer = model.trainer.optimizers[0].state_dict()
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            state[f"adam.{index}.{key}"] = torch.as_tensor(value).clone()
    return state


def test_resume_continues_exactly(tmp_path):
    """Stopped at step 4 and resumed to 8 == 8 uninterrupted steps, bit for bit: weights, EMA, projection
    norms, Adam moments and the loss-noise generator all come from the checkpoint.

    One batch per epoch keeps the data identical whatever Lightning's loop does with a map-style loader on
    restart; the real training data is drawn by micro-batch number (flowmo.data.indexed), which
    tests/test_faults.py checks through the CLI with a kill and a resume.
    """
    steps = 4
    kwargs = dict(ema_every=3, lr=1e-3, freeze_encoder_after=None)

    L.seed_everything(0)
    straight = module(**kwargs)
    trainer(2 * steps).fit(straight, loader(4, 4))

    L.seed_everything(0)
    first = module(**kwargs)
    first_run = trainer(steps)
    first_run.fit(first, loader(4, 4))
    checkpoint = tmp_path / "half.ckpt"
    first_run.save_checkpoint(checkpoint)

    L.seed_everything(1)  # a different global seed: everything that matters must come from the checkpoint
    resumed = module(**kwargs)
    trainer(2 * steps).fit(resumed, loader(4, 4), ckpt_path=str(checkpoint))

    expected, actual = _state(straight), _state(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_the_stage_decides_the_terms_and_refuses_one_it_does_not_use():
    stage_1a = LossRecipe().for_stage("1a")
    assert stage_1a.perceptual_weight == 0.1 and stage_1a.sample_weight == 0.0
    assert (stage_1a.entropy_weight, stage_1a.commitment_weight) == (0.0025, 0.000625)  # the quantizer's, paper
    stage_1b = LossRecipe(perceptual="none", sample_loss="resnet50_logits").for_stage("1b")
    assert stage_1b.perceptual_weight == 0.0 and stage_1b.sample_weight == 0.01
    with pytest.raises(ValueError, match="Stage 1B trains no perceptual loss"):
        LossRecipe(perceptual="lpips_vgg", sample_loss="pixel_mse").for_stage("1b")
    with pytest.raises(ValueError, match="Stage 1A has no chain-sample loss"):
        module_with(preset="tiny", perceptual="none", sample_loss="pixel_mse")
    with pytest.raises(ValueError, match="stage must be one of"):
        LossRecipe().for_stage("2")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_at_the_freeze_equals_the_run_that_froze_in_place(tmp_path, schedule):
    """A run resumed from the checkpoint of the freeze step (as plain DDP's second leg is) freezes the encoder at
    load and rebuilds Adam and the schedule with the decoder group alone: bit-equal to freezing mid-run."""
    kwargs = dict(ema_every=1, lr=1e-3, freeze_encoder_after=2, lr_schedule=schedule)
    L.seed_everything(0)
    straight = module(**kwargs)
    trainer(5).fit(straight, loader(4, 4))

    class StopAtTheFreeze(L.Callback):  # leg 1 under plain DDP: same max_steps (the cosine's length), stops at 2
        def on_train_batch_end(self, trainer, pl_module, *args):
            trainer.should_stop = trainer.global_step == 2

    L.seed_everything(0)
    first = module(**kwargs)
    first_run = trainer(5, callbacks=[StopAtTheFreeze()])
    first_run.fit(first, loader(4, 4))
    assert first_run.global_step == 2
    first_run.save_checkpoint(tmp_path / "freeze.ckpt")
    resumed = module(**kwargs)
    resumed_run = trainer(5)
    resumed_run.fit(resumed, loader(4, 4), ckpt_path=str(tmp_path / "freeze.ckpt"))

    assert [group["name"] for group in resumed_run.optimizers[0].param_groups] == ["decoder"]
    expected, actual = _state_by_name(straight), _state_by_name(resumed)
    assert expected.keys() == actual.keys() and any(".exp_avg_sq" in name for name in expected)
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, differing[:5]


def _state_by_name(model: FlowMoModule) -> dict[str, torch.Tensor]:
    """Weights, EMA, buffers and Adam's state keyed by parameter name (the two runs number their groups apart)."""
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    optimizer = model.trainer.optimizers[0]
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            state[f"adam.{name}.{key}"] = torch.as_tensor(value).clone()
    return state
