"""FlowMoModule: the two training stages of FlowMo as one LightningModule (spec sections 3 and 5).

stage "1a" (mode matching): encoder + decoder, flow + LPIPS on the x0 estimate + quantizer losses; the
encoder is frozen after `freeze_encoder_after` optimizer steps (200k in the paper) and Adam restarts.
stage "1b" (mode seeking): starts from 1A weights (`init_weights`), encoder frozen from step 0, flow loss +
0.01 x ResNet-50-logit MSE on an 8-step sample back-propagated through the chain.

Around every optimizer step: weight-norm projection of the block linears, EMA every 10 steps. EMA,
projection norms, optimizer and the loss-noise generator are all in the checkpoint: a resumed run continues
exactly (the authors' code restarts EMA and Adam on resume).
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from flowmo import checkpoint
from flowmo.config import config_differences, resolve_config
from flowmo.errors import UserError
from flowmo.losses import LossRecipe, flowmo_loss
from flowmo.metrics import ReconstructionMetrics
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.optim import ModelEMA, WeightNormProjection, adam_kernel
from flowmo.perceptual import build_perceptual
from flowmo.training_stats import batch_codebook_stats, global_norm

STAGES = ("1a", "1b")
LR_SCHEDULES = ("constant", "cosine")
INIT_PARTS = ("all", "encoder")


class FlowMoModule(L.LightningModule):
    def __init__(
        self,
        preset: str = "tiny",
        architecture: dict[str, Any] | None = None,
        stage: str = "1a",
        lr: float = 1e-4,
        lr_schedule: str = "constant",
        betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        time_schedule: str = "fat_lognormal",
        cfg_dropout: float = 0.1,
        flow_weight: float = 1.0,
        perceptual: str = "lpips_vgg",
        perceptual_weight: float = 0.1,
        sample_loss: str = "none",
        sample_loss_weight: float = 0.01,
        sample_steps: int = 8,
        feature_weights: str | None = None,
        freeze_encoder_after: int | None = 200_000,
        reset_optimizer_on_freeze: bool = True,
        weight_norm_projection: bool = True,
        ema_decay: float = 0.9999,
        ema_every: int = 10,
        init_weights: str | None = None,
        init_weights_from: str = "ema",
        init_weights_parts: str = "all",
        compile: bool = False,
        checkpoint_chain: bool = True,
        seed: int = 0,
        val_steps: int = 25,
        val_rho: float = 4.0,
        val_cfg: float = 1.5,
        val_cfg_interval: tuple[float, float] | None = (0.17, 1.02),
        val_use_ema: bool = True,
        val_lpips_nets: tuple[str, ...] = (),
        val_rfid: bool = False,
        inception_path: str | None = None,
        max_nonfinite_steps: int = 5,
    ):
        """Arguments map one to one onto the paper's knobs; configs/stage/{1a,1b}.yaml hold its recipes.

        Args:
            preset: named architecture: lo, hi, small, tiny or demo (flowmo.presets).
            architecture: FlowMoConfig fields overriding the preset, e.g. {"patch_size": 8}.
            stage: 1a (mode matching: encoder + decoder) or 1b (mode seeking: encoder frozen, chain loss).
            lr: Adam learning rate (paper: 1e-4 in 1A, 5e-5 in 1B).
            lr_schedule: constant (paper) or cosine (decays to 0 at trainer.max_steps).
            betas: Adam betas (paper: 0.9, 0.95).
            adam_eps: Adam epsilon.
            time_schedule: how t is drawn in the flow loss: fat_lognormal (paper: logit-normal with a 10% uniform
                tail), lognormal, uniform or noise_weighted (t = sqrt(U), the CPU demo's).
            cfg_dropout: probability of the null code in training (enables CFG at sampling; paper 0.1).
            flow_weight: weight of the flow-matching MSE.
            perceptual: 1A perceptual loss on the x0 estimate: lpips_vgg (paper), pixel_mse or none.
            perceptual_weight: its weight (paper 0.1).
            sample_loss: 1B loss on the 8-step chain sample: resnet50_logits (paper), pixel_mse or none.
            sample_loss_weight: its weight (paper 0.01 for ResNet logits).
            sample_steps: Euler steps of the 1B chain (paper 8).
            feature_weights: weights of the frozen feature nets (LPIPS, ResNet-50, Inception): None = the
                pretrained files (cached, else downloaded on first use; offline, an error names a missing file), a folder holding the
                .pth files, or "random" = explicit random stand-ins for CPU tests (logged loudly, recorded).
            freeze_encoder_after: optimizer step after which the 1A encoder is frozen (paper 200k; null = never).
            reset_optimizer_on_freeze: restart Adam's moments at the freeze (the authors rebuild the optimizer).
            weight_norm_projection: keep each weight matrix at its initial norm after every step (paper).
            ema_decay: EMA decay per EMA update (paper 0.9999).
            ema_every: optimizer steps between EMA updates (paper 10; decay applies per update).
            init_weights: start from these weights (a .ckpt, exported .pt or official .pth; 1B needs a 1A file).
            init_weights_from: ema or raw weights of init_weights.
            init_weights_parts: "all" loads the whole tokenizer; "encoder" only the encoder, keeping the decoder's
                fresh init (with freeze_encoder_after=0: the Table-4 "MSE-pretrained encoder, then frozen" cell,
                configs/ablations/overlays/mse_frozen_encoder.yaml).
            compile: torch.compile the transformer blocks.
            checkpoint_chain: activation-checkpoint the 1B chain (less memory, ~1/3 more compute).
            seed: seeds the noise generator (t, noise, CFG dropout, chain grids) and evaluation noise.
            val_steps: sampler steps in validation/test (paper 25).
            val_rho: sampler grid t_k = (k/n)^rho (paper 4).
            val_cfg: classifier-free guidance scale (paper 1.5; 1 = off).
            val_cfg_interval: EDM sigma interval where CFG applies (paper 0.17, 1.02; null = every step).
            val_use_ema: evaluate the EMA weights (paper) rather than the raw ones.
            val_lpips_nets: LPIPS variants computed in validation/test: alex and/or vgg.
            val_rfid: compute rFID (Inception weights needed).
            inception_path: the pt_inception-2015-12-05 file for rFID (default: cached, else downloaded).
            max_nonfinite_steps: an optimizer step whose loss or gradients are not finite is skipped (no weight,
                EMA or Adam update) and counted (train/skipped_nonfinite); this many in a row stop the run.
        """
        super().__init__()
        if stage not in STAGES:
            raise UserError(f"stage must be one of {STAGES}, got {stage!r}.")
        if lr_schedule not in LR_SCHEDULES:
            raise UserError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
        if stage == "1b" and not init_weights:
            raise UserError("Stage 1B starts from Stage-1A weights: set model.init_weights to a 1A checkpoint "
                             "(or an official flowmo_*.pth).")
        if init_weights_parts not in INIT_PARTS or (init_weights_parts != "all" and not init_weights):
            raise UserError(f"init_weights_parts must be one of {INIT_PARTS} and 'encoder' needs model.init_weights; "
                             f"got {init_weights_parts!r} with init_weights={init_weights!r}.")
        self.save_hyperparameters()
        self.config = resolve_config(preset, architecture)
        self.tokenizer = FlowMoTokenizer(self.config)
        if init_weights:
            self._load_initial_weights(init_weights, init_weights_from, init_weights_parts)
        self.recipe = LossRecipe(
            flow_weight=flow_weight, perceptual_weight=perceptual_weight if stage == "1a" else 0.0,
            sample_weight=sample_loss_weight if stage == "1b" else 0.0, time_schedule=time_schedule,
            cfg_dropout=cfg_dropout, chain_steps=sample_steps, checkpoint_chain=checkpoint_chain)
        self.perceptual_net = build_perceptual(perceptual if self.recipe.perceptual_weight else "none", feature_weights)
        self.sample_net = build_perceptual(sample_loss if self.recipe.sample_weight else "none", feature_weights)
        self.ema = ModelEMA(self.tokenizer, ema_decay, ema_every)
        self.weight_projection = WeightNormProjection(self.tokenizer) if weight_norm_projection else None
        if stage == "1b":
            self._set_encoder_trainable(False)
        self._noise_generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self.val_metrics = self._build_metrics()
        self._loss_parts: dict[str, Tensor] = {}  # the last micro-batch's loss terms (named in a divergence error)
        self._nonfinite_micro_batches = 0  # since the last optimizer step
        self.skipped_nonfinite = 0  # optimizer steps skipped in this process (they still count toward max_steps)
        self._nonfinite_in_a_row = 0

    # ---------------------------------------------------------------------------------------- set-up
    def _load_initial_weights(self, path: str, which: str, parts: str = "all") -> None:
        """Weights only (no optimizer, no step): how Stage 1B starts from Stage 1A; `parts="encoder"` takes
        the encoder alone (a pre-trained encoder under a fresh decoder). `path` may be a released name (lo, hi)."""
        state, config = checkpoint.load_state(path, which, config=self.config)
        if config != self.config:
            raise UserError(f"init_weights {path} has another architecture than the configured one "
                            f"({'; '.join(config_differences(config, self.config))}); use that file's model config.")
        if parts == "encoder":
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
            checkpoint.load_into(self.tokenizer.encoder, state, path)
            return
        checkpoint.load_into(self.tokenizer, state, path)

    def _build_metrics(self) -> ReconstructionMetrics:
        hp = self.hparams
        fid_feature = False
        if hp.val_rfid:
            fid_feature = "random" if hp.feature_weights == "random" else None
        # A folder given as feature_weights also holds the Inception file, unless inception_path says otherwise.
        inception_path = hp.inception_path
        if inception_path is None and hp.feature_weights not in (None, "random") and Path(hp.feature_weights).is_dir():
            inception_path = hp.feature_weights
        return ReconstructionMetrics(lpips_nets=tuple(hp.val_lpips_nets), lpips_weights=hp.feature_weights,
                                     fid_feature=fid_feature, inception_path=inception_path,
                                     codebook_bits=self._codebook_bits())

    def _codebook_bits(self) -> int | None:
        return self.config.entropy_group_bits if self.config.quantizer == "lfq" else None

    def configure_model(self) -> None:
        if self.hparams.compile:
            self.tokenizer.encoder.compile()
            self.tokenizer.decoder.compile()

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        """Adam(0.9, 0.95), no weight decay; encoder and decoder groups (spec 5). The paper's lr is constant;
        `lr_schedule="cosine"` anneals it to 0 at trainer.max_steps, an option for short runs (the CPU demo measured
        no gain from it: 20.6 dB held-out PSNR after 3000 steps either way, so it keeps the constant lr)."""
        groups = [{"params": list(self.tokenizer.decoder.parameters()), "name": "decoder"}]
        if self.hparams.stage == "1a":
            groups.insert(0, {"params": list(self.tokenizer.encoder.parameters()), "name": "encoder"})
        optimizer = torch.optim.Adam(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                     eps=self.hparams.adam_eps, weight_decay=0.0, **adam_kernel(self.device))
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps
        if total <= 0:
            raise UserError("lr_schedule 'cosine' anneals to 0 at trainer.max_steps: set --trainer.max_steps.")
        cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def stand_ins(self) -> list[str]:
        """Frozen feature networks running with random weights (their numbers mean nothing)."""
        nets = [self.perceptual_net, self.sample_net]
        names = [net.name for net in nets if net is not None and net.is_stand_in]
        return sorted(set(names + self.val_metrics.stand_ins))

    # ---------------------------------------------------------------------------------------- encoder freeze
    def _set_encoder_trainable(self, trainable: bool) -> None:
        self.tokenizer.encoder.requires_grad_(trainable)
        self.recipe = replace(self.recipe, train_encoder=trainable)

    def _freeze_due(self) -> bool:
        after = self.hparams.freeze_encoder_after
        return self.recipe.train_encoder and after is not None and self.global_step >= after

    def on_train_start(self) -> None:
        if self._freeze_due():  # resumed past the freeze: the checkpointed optimizer is already post-freeze
            self._set_encoder_trainable(False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._freeze_due():
            self._set_encoder_trainable(False)
            if self.hparams.reset_optimizer_on_freeze:  # the authors rebuild Adam: every moment restarts
                for optimizer in self.trainer.optimizers:
                    optimizer.state.clear()

    # ---------------------------------------------------------------------------------------- training
    @property
    def noise_generator(self) -> torch.Generator:
        """One generator for t, noise, CFG dropout and chain grids, seeded per rank and checkpointed."""
        if self._noise_generator is None or self._noise_generator.device != self.device:
            self._noise_generator = torch.Generator(device=self.device)
            self._noise_generator.manual_seed(self.hparams.seed * 1_000_003 + self.global_rank)
            if self._pending_generator_state is not None:
                self._noise_generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
        return self._noise_generator

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = _images(batch)
        out = flowmo_loss(self.tokenizer, images, self.recipe, self.perceptual_net, self.sample_net,
                          self.noise_generator)
        self._loss_parts = {k: v.detach() for k, v in out.parts.items()}
        if not torch.isfinite(out.total.detach()).all():
            self._nonfinite_micro_batches += 1
        self.log_dict({f"train/{k}": v for k, v in out.parts.items()}, batch_size=images.shape[0])
        if self._is_logging_step() and out.indices is not None and self.tokenizer.quantizer.codebook_size <= 2**20:
            # 2^G sub-codes for LFQ, prod(levels) for FSQ (its indices are whole tokens; a histogram only while
            # the codebook is small enough to count: 2^18 for the paper's FSQ cell, not 8^24 for the tiny grid's)
            stats = batch_codebook_stats(out.indices, self.tokenizer.quantizer.codebook_size)
            self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=images.shape[0])
        return out.total

    def _is_logging_step(self) -> bool:
        every = getattr(self.trainer, "log_every_n_steps", 50) or 50
        return self.global_step % every == 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._is_logging_step():
            grads = [p.grad for p in self.tokenizer.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", global_norm(grads))
            self.log("train/param_norm", global_norm([p.detach() for p in self.tokenizer.parameters()]))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # Run the last micro-batch's forward + backward here, so a non-finite update can be dropped before
        # Adam, the weight projection or the EMA see it (Lightning requires the closure to be called).
        result = optimizer_closure() if optimizer_closure is not None else None
        if not self._update_is_finite():
            optimizer.zero_grad(set_to_none=True)
            self._skip_nonfinite_step()
            return
        self._nonfinite_in_a_row = 0
        super().optimizer_step(epoch, batch_idx, optimizer, lambda: result)
        if self.weight_projection is not None:
            self.weight_projection.apply_to(self.tokenizer)
        # global_step does not count this step yet: the EMA moves after steps every, 2*every, ...
        if (self.global_step + 1) % self.ema.every == 0:
            self.ema.update(self.tokenizer)
            if self._is_logging_step():
                self.log("train/ema_relative_distance", self.ema.relative_distance(self.tokenizer))

    def _update_is_finite(self) -> bool:
        """Every micro-batch loss of this step and every gradient finite (one device sync per step)."""
        grads = [p.grad for p in self.tokenizer.parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(norm) for norm in torch._foreach_norm(grads)]).all() if grads else True
        nonfinite_loss, self._nonfinite_micro_batches = self._nonfinite_micro_batches, 0
        return bool(finite) and nonfinite_loss == 0

    def _skip_nonfinite_step(self) -> None:
        self.skipped_nonfinite += 1
        self._nonfinite_in_a_row += 1
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite))
        limit = self.hparams.max_nonfinite_steps
        terms = [k for k, v in self._loss_parts.items() if not torch.isfinite(v).all()] or ["gradients only"]
        print(f"flowmo: skipped optimizer step {self.global_step + 1}: non-finite {', '.join(terms)} "
              f"({self._nonfinite_in_a_row} in a row; the run stops at {limit})", file=sys.stderr)
        if self._nonfinite_in_a_row >= limit:
            from flowmo.faults import NonFiniteTraining, latest_checkpoint

            run_dir = Path(self.trainer.default_root_dir) if self._trainer is not None else None
            last = latest_checkpoint(run_dir, report=lambda _: None) if run_dir else None
            raise NonFiniteTraining(
                f"{limit} optimizer steps in a row (up to step {self.global_step + 1}) had a non-finite "
                f"{' / '.join(terms)}; no weight, EMA or Adam state moved in those steps and nothing non-finite was "
                f"saved. The last good checkpoint is {last or 'none (no save yet)'}: lower --model.lr or check the "
                "data, then resume with --ckpt_path last.")

    # ---------------------------------------------------------------------------------------- evaluation
    def sampler_settings(self) -> dict[str, Any]:
        hp = self.hparams
        interval = tuple(hp.val_cfg_interval) if hp.val_cfg_interval is not None else None
        return dict(steps=hp.val_steps, rho=hp.val_rho, cfg=hp.val_cfg, cfg_interval=interval)

    def eval_tokenizer(self) -> FlowMoTokenizer:
        return self.ema.module if self.hparams.val_use_ema else self.tokenizer

    def reconstruct_batch(self, images: Tensor, batch_idx: int) -> tuple[Tensor, Tensor | None]:
        """Reconstruction with noise fixed by (seed, rank, batch index): repeated evaluations compare."""
        model = self.eval_tokenizer()
        quantized = model.quantize(model.encode(images, check=False), with_losses=False)
        generator = torch.Generator(device=images.device)
        generator.manual_seed(self.hparams.seed * 7919 + self.global_rank * 1_000_003 + batch_idx)
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
        return model.sample(quantized.codes, noise, **self.sampler_settings()), quantized.indices

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images = _images(batch)
        reconstructions, indices = self.reconstruct_batch(images, batch_idx)
        self.val_metrics.update(images, reconstructions, indices)
        return {"images": images, "reconstructions": reconstructions}

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.last_test_metrics = self._log_metrics("test")

    def _log_metrics(self, split: str) -> dict[str, float]:
        results = self.val_metrics.compute()  # already reduced over all ranks
        self.val_metrics.reset()
        # Every rank holds the same reduced values and logs them, so ModelCheckpoint/EarlyStopping can monitor
        # val/rfid on every rank (rank_zero_only would hide it from the others). sync_dist averages identical
        # values: one small all-reduce per validation, and no DDP warning.
        self.log_dict({f"{split}/{k}": v for k, v in results.items()}, sync_dist=True)
        return results

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from flowmo.faults import CheckpointSaveError

        bad = next((k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()),
                   None)
        if bad is not None:  # a resumable file must never carry a poisoned weight
            raise CheckpointSaveError(f"refusing to save a checkpoint whose {bad} is not finite; the previous "
                                      "checkpoints are intact: resume from them with a lower --model.lr.")
        checkpoint["flowmo_config"] = self.config.to_dict()
        checkpoint["flowmo_noise_generator"] = self.noise_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_generator_state = checkpoint.get("flowmo_noise_generator")
        self._noise_generator = None


def _images(batch: Any) -> Tensor:
    """Batches are dicts from FlowMoDataModule ({"image": ...}) or plain image tensors."""
    return batch["image"] if isinstance(batch, dict) else batch
