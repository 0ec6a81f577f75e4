"""torch.compile stays compiled (issue 21): a Stage-1A run through the encoder freeze with validation, then Stage 1B,
compiles a few graphs per transformer and never reaches dynamo's recompile limit (which would fall back to eager
silently; here it raises). Dynamo's guards do not depend on the backend, so the count runs with backend="eager"
(seconds); the slow test runs inductor's kernels and checks Stage-1A and 1B losses and gradients against eager's."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from flowmo.flow import SamplerSettings
from flowmo.module import FlowMoModule
from module_fields import module_with

warnings.filterwarnings("ignore")
# encoder: train, eval, a last batch of 1 (dynamo specialises size 1); decoder: the same three, after the freeze (its
# condition no longer needs a gradient) and the 1B chain (its input does). The batch is marked dynamic, so B, 2B (a
# guided step) and other partial batches share one graph.
MAX_GRAPHS_PER_TRANSFORMER = 5


class EagerCompiled(FlowMoModule):
    compile_options = {"backend": "eager"}


def trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        precision="bf16-mixed",
    )


@pytest.fixture
def dynamo_fails_at_the_limit(monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    yield
    torch._dynamo.reset()


def graphs_per_transformer() -> dict[str, int]:
    """Compiled frames per code object, from dynamo's own cache entries."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from flowmo.nn.transformer import DecoderTransformer, EncoderTransformer

    return {
        cls.__name__: len(_debug_get_cache_entry_list(cls.forward.__code__))
        for cls in (EncoderTransformer, DecoderTransformer)
    }


@pytest.mark.slow
def test_1a_through_the_freeze_validation_and_1b_stay_compiled(dynamo_fails_at_the_limit, tmp_path):
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train, val = DataLoader(images, batch_size=2), DataLoader(images[:3], batch_size=2)  # a last batch of 1 too
    sampler = SamplerSettings(steps=4, cfg=1.5, cfg_interval=(0.17, 1.02))  # guided steps: the paired 2B call
    stage_1a = module_with(
        EagerCompiled,
        preset="tiny",
        perceptual="none",
        feature_weights="random",
        compile=True,
        freeze_encoder_after=2,
        ema_every=1,
        sampler=sampler,
    )
    run = trainer(4)
    run.fit(stage_1a, train, val)
    run.save_checkpoint(tmp_path / "1a.ckpt")
    stage_1b = module_with(
        EagerCompiled,
        preset="tiny",
        stage="1b",
        perceptual="none",
        weights=str(tmp_path / "1a.ckpt"),
        sample_loss="pixel_mse",
        chain_steps=3,
        compile=True,
        ema_every=1,
        sampler=sampler,
    )
    trainer(2).fit(stage_1b, train, val)
    graphs = graphs_per_transformer()
    assert 0 < graphs["EncoderTransformer"] <= MAX_GRAPHS_PER_TRANSFORMER, graphs
    assert 0 < graphs["DecoderTransformer"] <= MAX_GRAPHS_PER_TRANSFORMER, graphs
    assert graphs["DecoderTransformer"] < torch._dynamo.config.recompile_limit


@pytest.mark.slow
def test_inductor_training_steps_equal_eager_at_micro_batch_1_and_2():
    """tests/scripts/inductor_vs_eager.py in a fresh interpreter: Stage-1A and 1B losses and gradients through
    inductor's CPU kernels against eager (1A at micro-batch 1 and 2, 1B at 2; fp32, 1e-3 of each gradient's norm)."""
    script = Path(__file__).parent / "scripts" / "inductor_vs_eager.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("worst gradient") == 3, result.stdout
