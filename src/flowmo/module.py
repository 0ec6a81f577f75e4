"""FlowMoModule: the two training stages of FlowMo as one LightningModule (method §3 and §5).

stage "1a" (mode matching): encoder + decoder, flow + LPIPS on the x0 estimate + quantizer losses; the
encoder is frozen after `freeze_encoder_after` optimizer steps (200k in the paper) and Adam restarts.
stage "1b" (mode seeking): starts from 1A weights (`init_weights`), encoder frozen from step 0, flow loss +
0.01 x ResNet-50-logit MSE on an 8-step sample back-propagated through the chain.

It composes pieces that live elsewhere: the network (nn/), the loss recipe (losses), the update after each backward
(optim.TrainingUpdate), the non-finite guard (faults), init weights (checkpoint) and the metrics (metrics/). EMA,
projection norms, optimizer and each rank's noise are checkpointed: a resumed run continues exactly.
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
from torch.nn.parallel import DistributedDataParallel

from flowmo import checkpoint, optim
from flowmo.errors import UserError
from flowmo.faults import NonFiniteGuard, refuse_non_finite_weights
from flowmo.flow import SAMPLERS, SamplerSettings
from flowmo.losses import LossRecipe, flowmo_loss
from flowmo.metrics import ReconstructionMetrics
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.noise import RankNoise, evaluation_noise
from flowmo.optim import ModelEMA, TrainingUpdate, WeightNormProjection
from flowmo.perceptual import build_perceptual
from flowmo.presets import resolve_config
from flowmo.training_stats import batch_codebook_stats, global_norm

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
        ema_warmup: bool = True,
        init_weights: str | None = None,
        init_weights_from: str = "ema",
        init_weights_parts: str = "all",
        compile: bool = False,
        checkpoint_chain: bool = True,
        activation_checkpointing: str = "none",
        seed: int = 0,
        sampler: SamplerSettings = SAMPLERS["paper"],
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
            perceptual: 1A perceptual loss on the x0 estimate: lpips_vgg (paper), pixel_mse or none (1B: none).
            perceptual_weight: its weight (paper 0.1).
            sample_loss: 1B loss on the 8-step chain sample: resnet50_logits (paper), pixel_mse or none (1A: none).
            sample_loss_weight: its weight (paper 0.01 for ResNet logits).
            sample_steps: Euler steps of the 1B chain (paper 8).
            feature_weights: the frozen feature nets' files: None = their caches (downloaded on first use), a
                folder holding them, or "random" = stand-ins for CPU tests (said loudly, recorded).
            freeze_encoder_after: optimizer step after which the 1A encoder is frozen (paper 200k; null = never).
            reset_optimizer_on_freeze: restart Adam's moments at the freeze (the authors rebuild the optimizer).
            weight_norm_projection: keep each weight matrix at its initial norm after every step (paper).
            ema_decay: EMA decay per EMA update (paper 0.9999).
            ema_every: optimizer steps between EMA updates (paper 10; decay applies per update).
            ema_warmup: cap update n's decay at (1 + n) / (20 + n) (flowmo.optim.ModelEMA): a short run's EMA is not
                its random init, the paper's steady state is unchanged; off from init_weights (Stage 1B).
            init_weights: start from these weights (a .ckpt, exported .pt, official .pth or a released name lo / hi;
                1B needs a 1A file).
            init_weights_from: ema or raw weights of init_weights.
            init_weights_parts: "all" loads the whole tokenizer; "encoder" only the encoder, keeping the decoder's
                fresh init (with freeze_encoder_after=0: the Table-4 "MSE-pretrained encoder, then frozen" cell).
            compile: torch.compile encoder and decoder (the EMA copy used for evaluation too).
            checkpoint_chain: activation-checkpoint the 1B chain (less memory, ~1/3 more compute).
            activation_checkpointing: recompute transformer blocks in backward: none, blocks (every block) or
                every_K (every K-th block); `flowmo plan` predicts the peak memory of each setting.
            seed: seeds the noise generator (t, noise, CFG dropout, chain grids) and evaluation noise.
            sampler: how validation and test decode (flow.SamplerSettings, default SAMPLERS["paper"]); single
                fields as --model.sampler.steps 8.
            val_use_ema: evaluate the EMA weights (paper) rather than the raw ones.
            val_lpips_nets: LPIPS variants computed in validation/test: alex and/or vgg.
            val_rfid: compute rFID (Inception weights needed).
            inception_path: the pt_inception-2015-12-05 file for rFID (default: found like the other feature nets).
            max_nonfinite_steps: a step with a non-finite loss or gradient is skipped and counted
                (train/skipped_nonfinite); this many in a row stop the run.
        """
        super().__init__()
        _check_choices(lr_schedule, init_weights, init_weights_parts, stage)
        self.save_hyperparameters()
        self.sampler = sampler if isinstance(sampler, SamplerSettings) else SamplerSettings(**sampler)
        self.hparams["sampler"] = self.sampler.to_dict()  # plain values: checkpoints stay loadable weights-only
        self.config = resolve_config(preset, architecture)
        self.tokenizer = FlowMoTokenizer(self.config)
        try:
            self.tokenizer.set_activation_checkpointing(activation_checkpointing)
        except ValueError as error:
            raise UserError(str(error)) from None
        if init_weights:
            checkpoint.load_initial_weights(self.tokenizer, init_weights, init_weights_from, init_weights_parts)
        self.recipe = LossRecipe.for_stage(
            stage,
            perceptual=perceptual,
            perceptual_weight=perceptual_weight,
            sample_loss=sample_loss,
            sample_weight=sample_loss_weight,
            flow_weight=flow_weight,
            time_schedule=time_schedule,
            cfg_dropout=cfg_dropout,
            chain_steps=sample_steps,
            checkpoint_chain=checkpoint_chain,
        )
        self.perceptual_net = build_perceptual(
            self.recipe.perceptual if self.recipe.perceptual_weight else "none", feature_weights
        )
        self.sample_net = build_perceptual(
            self.recipe.sample_loss if self.recipe.sample_weight else "none", feature_weights
        )
        self.ema = ModelEMA(
            self.tokenizer, ema_decay, ema_every, optim.warmup_applies(ema_warmup, init_weights, init_weights_parts)
        )
        self.weight_projection = WeightNormProjection(self.tokenizer) if weight_norm_projection else None
        self.update = TrainingUpdate(self.tokenizer, self.ema, self.weight_projection)
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        if stage == "1b":
            self._set_encoder_trainable(False)
        self.val_metrics = ReconstructionMetrics.for_evaluation(
            lpips_nets=tuple(val_lpips_nets),
            rfid=val_rfid,
            feature_weights=feature_weights,
            inception_path=inception_path,
            codebook_bits=self.tokenizer.quantizer.id_bits,
        )
        self.noise = RankNoise(seed, key="flowmo_noise_generators")
        self._last_step_seen, self._loaded = 0, None  # _loaded: (step, hparams) of what validate / test loaded

    # ---------------------------------------------------------------------------------------- set-up
    compile_options: dict[str, Any] = {}  # torch.compile's keyword arguments (tests use backend="eager")

    def configure_model(self) -> None:
        """Encoder and decoder compiled, raw and EMA copy; each transformer has its own recompile budget and stable
        guards: at most 5 graphs each through 1A, the freeze, validation and 1B (tests/test_compile.py)."""
        if self.hparams.compile:
            for model in (self.tokenizer, self.ema.module):
                model.encoder.compile(**self.compile_options)
                model.decoder.compile(**self.compile_options)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        """Adam(0.9, 0.95), no weight decay; encoder and decoder groups (method §5). The lr is constant (paper);
        "cosine" anneals it to 0 at max_steps (the CPU demo gained nothing from it: 20.6 dB either way)."""
        groups = [{"params": list(self.tokenizer.decoder.parameters()), "name": "decoder"}]
        if self.recipe.train_encoder:  # 1A before the freeze (a run resumed past it builds the decoder group alone)
            groups.insert(0, {"params": list(self.tokenizer.encoder.parameters()), "name": "encoder"})
        optimizer = TrainingUpdate.adam(groups, self.hparams.lr, self.hparams.betas, self.hparams.adam_eps, self.device)
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

    def _freeze_due(self, step: int | None = None) -> bool:
        """Whether the encoder should be frozen at `step` (default: the current step) and is still training."""
        after = self.hparams.freeze_encoder_after
        step = self.global_step if step is None else step
        return self.recipe.train_encoder and after is not None and step >= after

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self._freeze_due() and _plain_ddp(self.trainer.model):
            # Plain DDP (no find_unused_parameters: no all-reduce of the frozen encoder's zeros on every later
            # step) cannot drop parameters mid-run: stop at the freeze; FinalCheckpoint saves last.ckpt, and the
            # resumed run freezes the encoder before DDP wraps the model (on_load_checkpoint).
            self.trainer.should_stop = True
            if self.global_rank == 0:
                print(
                    f"flowmo: the encoder freezes after step {self.global_step}: this run stops here; resume with "
                    "--ckpt_path last to train the decoder alone under plain DDP (make train-* does).",
                    file=sys.stderr,
                )
            return -1
        if self._freeze_due():
            self._set_encoder_trainable(False)
            if self.hparams.reset_optimizer_on_freeze:  # the authors rebuild Adam: every moment restarts
                for optimizer in self.trainer.optimizers:
                    optimizer.state.clear()

    # ---------------------------------------------------------------------------------------- training
    @property
    def noise_generator(self) -> torch.Generator:
        """One generator for t, noise, CFG dropout and chain grids, seeded per rank and checkpointed per rank."""
        return self.noise.generator(self.device, self.global_rank)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = _images(batch)
        out = flowmo_loss(
            self.tokenizer, images, self.recipe, self.perceptual_net, self.sample_net, self.noise_generator
        )
        self.guard.observe(out.parts)  # on the device: the decision waits for the last micro-batch
        self.log_dict({f"train/{k}": v for k, v in out.parts.items()}, batch_size=images.shape[0])
        if self._is_logging_step() and out.indices is not None and self.tokenizer.quantizer.codebook_size <= 2**20:
            # a histogram of the ids only while the codebook is small enough to count (not 8^24 for FSQ's tiny cell)
            stats = batch_codebook_stats(out.indices, self.tokenizer.quantizer.codebook_size)
            self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=images.shape[0])
        return out.total

    def _is_logging_step(self) -> bool:
        return self.global_step % (getattr(self.trainer, "log_every_n_steps", 50) or 50) == 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._is_logging_step():
            grads = [p.grad for p in self.tokenizer.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", global_norm(grads))
            self.log("train/param_norm", global_norm([p.detach() for p in self.tokenizer.parameters()]))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # The last micro-batch's forward + backward run first, so the guard's flag exists before Adam's kernel
        # reads it (Lightning requires the closure to be called inside this hook).
        result = optimizer_closure() if optimizer_closure is not None else None
        found_inf = self.guard.found_inf([p.grad for p in self.tokenizer.parameters() if p.grad is not None])
        self.update.step(
            optimizer,
            lambda: super(FlowMoModule, self).optimizer_step(epoch, batch_idx, optimizer, lambda: result),
            found_inf,
            step=self.global_step + 1,
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After each optimizer step, outside it: the guard's counters reach the host without a device sync; at
        logging steps the skip count and the EMA distance are logged."""
        if self.global_step == self._last_step_seen:
            return  # a micro-batch inside an accumulation group: no optimizer step yet
        self._last_step_seen = self.global_step
        run_dir = Path(self.trainer.default_root_dir) if self._trainer is not None else None
        skipped = self.guard.poll(self.global_step, run_dir)
        if self._is_logging_step():
            self.log("train/skipped_nonfinite", float(skipped))
            self.log("train/ema_relative_distance", self.ema.relative_distance(self.tokenizer))

    @property
    def skipped_nonfinite(self) -> int:
        """Optimizer steps skipped in this process so far (reads the device counter: for tests and reports)."""
        return 0 if self.guard.skipped is None else int(self.guard.skipped)

    # ---------------------------------------------------------------------------------------- evaluation
    def eval_tokenizer(self) -> FlowMoTokenizer:
        return self.ema.module if self.hparams.val_use_ema else self.tokenizer

    def evaluated_weights(self) -> dict:
        """flowmo.optim.weights_record of the weights validation and test decode with."""
        kind = "ema" if self.hparams.val_use_ema else "raw"
        if self._loaded is not None:  # a checkpoint validate / test loaded: its own hyper-parameters count its updates
            return optim.weights_record(kind, self._loaded[1], self._loaded[0])
        if self.hparams.init_weights and self.global_step == 0:  # loaded alone, into both copies
            return {**optim.weights_record(self.hparams.init_weights_from), "init_weights": self.hparams.init_weights}
        return optim.weights_record(kind, self.hparams, self.global_step)

    def _announce_evaluation(self) -> None:
        """validate / test: say which weights run, and log at the checkpoint's optimizer step (on the training curve),
        not Lightning's step 0. From the *_model_eval hooks: the last before the progress bar starts its line."""
        if self.trainer.state.fn != "fit" and self.global_rank == 0:
            what = optim.describe_weights(self.evaluated_weights())
            print(f"flowmo {self.trainer.state.fn.value}: {what}", file=sys.stderr)
        if self.trainer.state.fn != "fit" and self._loaded is not None:
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self._loaded[0]  # the step loggers use

    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()  # Lightning's: eval mode (the same for test)
        self._announce_evaluation()

    on_test_model_eval = on_validation_model_eval

    def reconstruct_batch(self, images: Tensor, batch_idx: int) -> tuple[Tensor, Tensor | None]:
        model = self.eval_tokenizer()
        quantized = model.quantize(model.encode(images, check=False), with_losses=False)
        noise = evaluation_noise(images, self.hparams.seed, self.global_rank, batch_idx)
        return model.sample_with(self.sampler, quantized.codes, noise), quantized.indices

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images = _images(batch)
        reconstructions, indices = self.reconstruct_batch(images, batch_idx)
        self.val_metrics.update(reconstructions, images, indices)
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
        refuse_non_finite_weights(checkpoint["state_dict"])  # a resumable file must never carry a poisoned weight
        checkpoint["flowmo_config"] = self.config.to_dict()
        self.noise.save(checkpoint, self.device, self.global_rank)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.ema.warmup &= "ema_warmup" in checkpoint.get("hyper_parameters", {})  # saved before it: no warm-up
        self.noise.load(checkpoint, self.trainer.world_size if self._trainer else 1, self.global_rank)
        step = int(checkpoint.get("global_step", 0))
        if self._trainer is None or self.trainer.state.fn != "fit":  # validate / test: what they evaluate
            self._loaded = (step, dict(checkpoint.get("hyper_parameters", {})))
        if self._freeze_due(step):
            # Resumed at or past the freeze: freeze before DDP wraps the model and before the optimizer is built, so
            # both hold the decoder alone. Adam restarts if the freeze happens now (the authors rebuild it).
            self._set_encoder_trainable(False)
            restart = self.hparams.reset_optimizer_on_freeze and step == self.hparams.freeze_encoder_after
            optim.drop_param_group(checkpoint, "encoder", clear=restart)


def _check_choices(lr_schedule: str, init_weights: str | None, init_weights_parts: str, stage: str) -> None:
    if lr_schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
    if stage == "1b" and not init_weights:
        raise UserError(
            "Stage 1B starts from Stage-1A weights: set model.init_weights to a 1A checkpoint "
            "(or an official flowmo_*.pth, or a released name: lo, hi)."
        )
    if init_weights_parts not in INIT_PARTS or (init_weights_parts != "all" and not init_weights):
        raise UserError(
            f"init_weights_parts must be one of {INIT_PARTS} and 'encoder' needs model.init_weights; "
            f"got {init_weights_parts!r} with init_weights={init_weights!r}."
        )


def _plain_ddp(model: Any) -> bool:
    """DDP that expects a gradient for every parameter it was built with."""
    return isinstance(model, DistributedDataParallel) and not model.find_unused_parameters


def _images(batch: Any) -> Tensor:
    """Batches are dicts from FlowMoDataModule ({"image": ...}) or plain image tensors."""
    return batch["image"] if isinstance(batch, dict) else batch
