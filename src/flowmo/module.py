"""FlowMoModule: the two training stages of FlowMo as one LightningModule (method §3 and §5).

stage "1a" (mode matching): encoder + decoder, flow + LPIPS on the x0 estimate + quantizer losses; the
encoder is frozen after `optim.freeze_encoder_after` optimizer steps (200k in the paper) and Adam restarts.
stage "1b" (mode seeking): starts from 1A weights (`init.weights`), encoder frozen from step 0, flow loss +
0.01 x ResNet-50-logit MSE on an 8-step sample back-propagated through the chain.

It composes pieces that live elsewhere: the network (nn/), the loss recipe (losses), the typed settings (settings),
the update after each backward (optim.TrainingUpdate), the non-finite guard (nonfinite), init weights (checkpoint)
and the metrics (metrics/). One optimizer step reads top-down in `optimizer_step`. EMA, projection norms, optimizer
and each rank's noise are checkpointed: a resumed run continues exactly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from flowmo import checkpoint, optim
from flowmo.errors import UserError
from flowmo.faults import refuse_non_finite_weights
from flowmo.flow import SamplerSettings
from flowmo.losses import LossRecipe, encoder_trains, flowmo_loss
from flowmo.metrics import ReconstructionMetrics
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.noise import RankNoise, evaluation_noise
from flowmo.nonfinite import NonFiniteGuard
from flowmo.optim import ModelEMA, TrainingUpdate, WeightNormProjection
from flowmo.perceptual import build_perceptual
from flowmo.presets import resolve_config
from flowmo.settings import EvalSettings, InitSettings, OptimSettings, as_group, group_hparams, plain
from flowmo.training_stats import batch_codebook_stats, global_norm


class FlowMoModule(L.LightningModule):
    def __init__(
        self,
        preset: str = "tiny",
        architecture: dict[str, Any] | None = None,
        stage: str = "1a",
        loss: LossRecipe = LossRecipe(),
        optim: OptimSettings = OptimSettings(),
        init: InitSettings = InitSettings(),
        eval: EvalSettings = EvalSettings(),
        feature_weights: str | None = None,
        activation_checkpointing: str = "none",
        compile: bool = False,
        seed: int = 0,
    ):
        """configs/stage/{1a,1b}.yaml hold the paper's recipes; each group's fields are documented on its class.

        Args:
            preset: named architecture: lo, hi, small, tiny or demo (flowmo.presets).
            architecture: FlowMoConfig fields overriding the preset, e.g. {"patch_size": 8}.
            stage: 1a (mode matching: encoder + decoder) or 1b (mode seeking: encoder frozen, chain loss).
            loss: every loss weight of the stage, the quantizer's included (losses.LossRecipe).
            optim: Adam, the projection, the EMA, the encoder freeze, the non-finite guard (settings.OptimSettings).
            init: the weights training starts from; Stage 1B needs a 1A file (settings.InitSettings).
            eval: the sampler and metrics of validation and test (settings.EvalSettings).
            feature_weights: the frozen feature nets' files: None = their caches (downloaded on first use), a
                folder holding them, or "random" = stand-ins for CPU tests (said loudly, recorded).
            activation_checkpointing: recompute transformer blocks in backward: none, blocks (every block) or
                every_K (every K-th block); `flowmo plan` predicts the peak memory of each setting.
            compile: torch.compile encoder and decoder (the EMA copy used for evaluation too).
            seed: seeds the noise generator (t, noise, CFG dropout, chain grids) and evaluation noise.
        """
        super().__init__()
        self.loss_settings = as_group(LossRecipe, loss)
        self.optim_settings = as_group(OptimSettings, optim)
        self.init_settings = as_group(InitSettings, init)
        self.eval_settings = as_group(EvalSettings, eval)
        if stage == "1b" and not self.init_settings.weights:
            raise UserError(
                "Stage 1B starts from Stage-1A weights: set model.init.weights to a 1A checkpoint "
                "(or an official flowmo_*.pth, or a released name: lo, hi)."
            )
        self.recipe = self.loss_settings.for_stage(stage)
        self.save_hyperparameters()
        for name in ("loss", "optim", "init", "eval"):  # plain values: checkpoints stay loadable weights-only
            self.hparams[name] = plain(getattr(self, f"{name}_settings"))
        self.config = resolve_config(preset, architecture)
        self.tokenizer = FlowMoTokenizer(self.config)
        try:
            self.tokenizer.set_activation_checkpointing(activation_checkpointing)
        except ValueError as error:
            raise UserError(str(error)) from None
        if self.init_settings.weights:
            init = self.init_settings
            checkpoint.load_initial_weights(self.tokenizer, init.weights, init.weights_from, init.parts)
        self.perceptual_net = build_perceptual(
            self.recipe.perceptual if self.recipe.perceptual_weight else "none", feature_weights
        )
        self.sample_net = build_perceptual(
            self.recipe.sample_loss if self.recipe.sample_weight else "none", feature_weights
        )
        self.ema = ModelEMA.for_settings(self.tokenizer, self.optim_settings, self.init_settings)
        self.weight_projection = (
            WeightNormProjection(self.tokenizer) if self.optim_settings.weight_norm_projection else None
        )
        self.update = TrainingUpdate(self.tokenizer, self.ema, self.weight_projection)
        self.guard = NonFiniteGuard(self.optim_settings.max_nonfinite_steps)
        if stage == "1b" or self.optim_settings.freeze_encoder_after == 0:  # the decoder alone from the first step
            self.tokenizer.encoder.requires_grad_(False)
        self.val_metrics = ReconstructionMetrics.for_evaluation(
            lpips_nets=self.eval_settings.lpips_nets,
            rfid=self.eval_settings.rfid,
            feature_weights=feature_weights,
            inception_path=self.eval_settings.inception_path,
            codebook_bits=self.tokenizer.quantizer.id_bits,
        )
        self.noise = RankNoise(seed, key="flowmo_noise_generators")
        self._loaded = None  # _loaded: (step, hparams) of what validate / test loaded

    @property
    def sampler(self) -> SamplerSettings:
        return self.eval_settings.sampler

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
        if encoder_trains(
            self.tokenizer
        ):  # 1A before the freeze (a run resumed past it builds the decoder group alone)
            groups.insert(0, {"params": list(self.tokenizer.encoder.parameters()), "name": "encoder"})
        optimizer = TrainingUpdate.adam(groups, self.optim_settings, self.device)
        if self.optim_settings.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps
        if total <= 0:
            raise UserError("optim.lr_schedule 'cosine' anneals to 0 at trainer.max_steps: set --trainer.max_steps.")
        cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def stand_ins(self) -> list[str]:
        """Frozen feature networks running with random weights (their numbers mean nothing)."""
        nets = [self.perceptual_net, self.sample_net]
        names = [net.name for net in nets if net is not None and net.is_stand_in]
        return sorted(set(names + self.val_metrics.stand_ins))

    # ---------------------------------------------------------------------------------------- training
    @property
    def noise_generator(self) -> torch.Generator:
        """One generator for t, noise, CFG dropout and chain grids, seeded per rank and checkpointed per rank."""
        return self.noise.generator(self.device, self.global_rank)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One micro-batch's loss; Lightning runs its backward (outside DDP's gradient sync until the last micro-batch
        of an accumulation group) and calls optimizer_step after the last one."""
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

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """One optimizer step, in order. Lightning calls it once per accumulation group, at its last micro-batch."""
        # 1. The last micro-batch's forward and backward (Lightning requires the closure to be called in this hook).
        result = optimizer_closure() if optimizer_closure is not None else None
        # 2. Skip or not: a non-finite loss or gradient on any rank gives 1.0, decided on the device.
        grads = [p.grad for p in self.tokenizer.parameters() if p.grad is not None]
        skip = self.guard.found_inf(grads)
        step = self.global_step + 1
        self._log_norms(grads, step)
        # 3. Adam (its fused kernel reads `skip`; Lightning's step runs the precision plugin and counts the step),
        #    then the weight-norm projection and the EMA, both holding still on a skipped step.
        lightning_step = super().optimizer_step
        self.update.step(optimizer, lambda: lightning_step(epoch, batch_idx, optimizer, lambda: result), skip, step)
        # 4. The skip counters reach the host without a device sync; `max_nonfinite_steps` in a row stop the run.
        self.guard.poll(step, Path(self.trainer.default_root_dir))
        if self._is_logging_step(step):
            self.log("train/skipped_nonfinite", self.guard.skipped)  # the device counter: no host value
            self.log("train/ema_relative_distance", self.ema.relative_distance(self.tokenizer))
        # 5. The Stage-1A encoder freeze, due after this step.
        if self._freeze_due(step):
            self._freeze_encoder(step)

    def _is_logging_step(self, step: int | None = None) -> bool:
        step = self.global_step if step is None else step
        return step % (getattr(self.trainer, "log_every_n_steps", 50) or 50) == 0

    def _log_norms(self, grads: list[Tensor], step: int) -> None:
        """Gradient and weight norms at the logging steps, logged on the device (no host read)."""
        if self._is_logging_step(step - 1):
            if grads:
                self.log("train/grad_norm", global_norm(grads))
            self.log("train/param_norm", global_norm([p.detach() for p in self.tokenizer.parameters()]))

    @property
    def skipped_nonfinite(self) -> int:
        """Optimizer steps skipped in this process so far (reads the device counter: for tests and reports)."""
        return 0 if self.guard.skipped is None else int(self.guard.skipped)

    # ---------------------------------------------------------------------------------------- encoder freeze
    def _freeze_due(self, step: int) -> bool:
        """Whether the encoder, still training, freezes after optimizer step `step` (Stage 1A, method §5)."""
        after = self.optim_settings.freeze_encoder_after
        return encoder_trains(self.tokenizer) and after is not None and step >= after

    def _freeze_encoder(self, step: int) -> None:
        if _plain_ddp(self.trainer.model):
            # Plain DDP (no find_unused_parameters: no all-reduce of the frozen encoder's zeros on every later
            # step) cannot drop parameters mid-run: stop here; FinalCheckpoint saves last.ckpt, and the resumed
            # run freezes the encoder before DDP wraps the model (on_load_checkpoint).
            self.trainer.should_stop = True
            if self.global_rank == 0:
                print(
                    f"flowmo: the encoder freezes after step {step}: this run stops here; resume with "
                    "--ckpt_path last to train the decoder alone under plain DDP (make train-* does).",
                    file=sys.stderr,
                )
            return
        self.tokenizer.encoder.requires_grad_(False)
        if self.optim_settings.reset_optimizer_on_freeze:  # the authors rebuild Adam: every moment restarts
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()

    # ---------------------------------------------------------------------------------------- evaluation
    def eval_tokenizer(self) -> FlowMoTokenizer:
        return self.ema.module if self.eval_settings.use_ema else self.tokenizer

    def evaluated_weights(self) -> dict:
        """flowmo.optim.weights_record of the weights validation and test decode with."""
        kind = "ema" if self.eval_settings.use_ema else "raw"
        if self._loaded is not None:  # a checkpoint validate / test loaded: its own hyper-parameters count its updates
            return optim.weights_record(kind, self._loaded[1], self._loaded[0])
        if self.init_settings.weights and self.global_step == 0:  # loaded alone, into both copies
            init = self.init_settings
            return {**optim.weights_record(init.weights_from), "init_weights": init.weights}
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
        saved = group_hparams(checkpoint.get("hyper_parameters", {}), "optim")
        self.ema.warmup &= "ema_warmup" in saved  # saved before the warm-up existed: none
        self.noise.load(checkpoint, self.trainer.world_size if self._trainer else 1, self.global_rank)
        step = int(checkpoint.get("global_step", 0))
        if self._trainer is None or self.trainer.state.fn != "fit":  # validate / test: what they evaluate
            self._loaded = (step, dict(checkpoint.get("hyper_parameters", {})))
        if self._freeze_due(step):
            # Resumed at or past the freeze: freeze before DDP wraps the model and before the optimizer is built, so
            # both hold the decoder alone. Adam restarts if the freeze happens now (the authors rebuild it).
            self.tokenizer.encoder.requires_grad_(False)
            settings = self.optim_settings
            restart = settings.reset_optimizer_on_freeze and step == settings.freeze_encoder_after
            optim.drop_param_group(checkpoint, "encoder", clear=restart)


def _plain_ddp(model: Any) -> bool:
    """DDP that expects a gradient for every parameter it was built with."""
    return isinstance(model, DistributedDataParallel) and not model.find_unused_parameters


def _images(batch: Any) -> Tensor:
    """Batches are dicts from FlowMoDataModule ({"image": ...}) or plain image tensors."""
    return batch["image"] if isinstance(batch, dict) else batch
