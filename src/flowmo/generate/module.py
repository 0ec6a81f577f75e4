"""MaskGITModule: a class-conditional MaskGIT trained on FlowMo token shards (LightningModule).

    flowmo gen fit -c configs/generator/tiny.yaml          # token shards from `flowmo pretokenize`

Training: cosine-scheduled whole-token masking, cross-entropy on the masked tokens' sub-tokens, class dropout
to the null class (for CFG). Validation: the same loss at a fixed seed; with `tokenizer` set, a grid of samples
decoded through it goes to TensorBoard (val/samples).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid

from flowmo.errors import UserError
from flowmo.generate import masking
from flowmo.generate.config import RECIPES, TokenLayout, resolve
from flowmo.generate.network import MaskGITTransformer
from flowmo.generate.tokens import check_same_tokenizer
from flowmo.noise import RankNoise
from flowmo.tools import load_tokenizer


class MaskGITModule(L.LightningModule):
    def __init__(
        self,
        token_layout: dict[str, Any] | None = None,
        preset: str = "tiny",
        architecture: dict[str, Any] | None = None,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
        weight_decay: float | None = None,
        warmup_steps: int = 0,
        label_smoothing: float | None = None,
        class_dropout: float | None = None,
        seed: int = 0,
        tokenizer: str | None = None,
        sample_steps: int = 8,
        sample_temperature: float = 1.0,
        sample_choice_temperature: float = 4.5,
        sample_cfg: float = 1.0,
        grid_classes: tuple[int, ...] = (0, 1, 2, 3),
        grid_per_class: int = 2,
    ):
        """
        Args:
            token_layout: tokens, groups, codebook_size, num_classes (and tokenizer_sha256) of the token shards;
                `flowmo gen fit` links it from the data module (the token manifest).
            preset: generator architecture, tiny or paper (flowmo.generate.config says where numbers come from).
            architecture: MaskGITConfig fields overriding the preset, e.g. {"depth": 12}.
            lr, betas, weight_decay, label_smoothing, class_dropout: AdamW and loss settings; None = the preset's
                recipe (config.RECIPES).
            warmup_steps: linear lr warm-up from 0 (0 = none).
            seed: seeds masking and class dropout (per rank) and validation.
            tokenizer: a tokenizer .ckpt/.pt/.pth: enables decoded sample grids, and must be the tokenizer that
                wrote the token shards (checked by weights hash).
            sample_*: decoding settings of the grids (MaskGIT: 8 steps, choice temperature 4.5).
            grid_classes, grid_per_class: which classes the grid shows, and how many samples of each.
        """
        super().__init__()
        if token_layout is None:
            raise UserError(
                "the generator needs model.token_layout (tokens, groups, codebook_size, num_classes); "
                "`flowmo gen fit` takes it from the data's token manifest."
            )
        self.save_hyperparameters()
        self.recipe = {
            **RECIPES.get(preset, RECIPES["tiny"]),
            **{
                key: value
                for key, value in dict(
                    lr=lr,
                    betas=betas,
                    weight_decay=weight_decay,
                    label_smoothing=label_smoothing,
                    class_dropout=class_dropout,
                ).items()
                if value is not None
            },
        }
        self.layout = TokenLayout.from_dict(token_layout)
        self.tokenizer_sha256 = token_layout.get("tokenizer_sha256")
        self.network = MaskGITTransformer(resolve(preset, architecture), self.layout)
        self.noise = RankNoise(seed, key="mask_generator_states")
        # the tokenizer, loaded on first use; held in a list so that it is no submodule: never trained, moved by
        # Lightning or checkpointed with the generator
        self._tokenizer_holder: list = []

    # ------------------------------------------------------------------------------------------- training
    @property
    def noise_generator(self) -> torch.Generator:
        """Masks and class dropout: seeded and checkpointed per rank, so a resumed run draws what it would have."""
        return self.noise.generator(self.device, self.global_rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.noise.save(checkpoint, self.device, self.global_rank)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.noise.load(checkpoint, self.trainer.world_size if self._trainer else 1, self.global_rank)

    def loss(
        self, ids: Tensor, classes: Tensor, generator: torch.Generator | None = None, class_dropout: float | None = None
    ) -> Tensor:
        """Masked-token cross-entropy of one batch: ids [B, L*F], classes [B]."""
        masked = masking.training_mask(ids.shape[0], self.layout.tokens, ids.device, generator)
        dropout = self.recipe["class_dropout"] if class_dropout is None else class_dropout
        classes = masking.drop_classes(classes, self.network.null_class, dropout, generator)
        logits = self.network(ids, masked, classes)
        return masking.masked_token_loss(logits, ids, masked, self.recipe["label_smoothing"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.loss(batch["ids"], batch["cls"], self.noise_generator)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)
        loss = self.loss(batch["ids"], batch["cls"], generator, class_dropout=0.0)
        self.log("val/loss", loss, batch_size=batch["ids"].shape[0])
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.hparams.tokenizer and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.log_sample_grid()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.network.parameters(),
            lr=self.recipe["lr"],
            betas=tuple(self.recipe["betas"]),
            weight_decay=self.recipe["weight_decay"],
        )
        warmup = self.hparams.warmup_steps
        if warmup <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        classes: Tensor,
        steps: int | None = None,
        temperature: float | None = None,
        choice_temperature: float | None = None,
        cfg: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Token ids [B, L*F] for class ids [B]; unset settings are the module's sample_* ones."""
        if classes.numel() and (classes.min() < 0 or classes.max() >= self.layout.num_classes):
            raise UserError(
                f"classes must lie in [0, {self.layout.num_classes}), got [{int(classes.min())}, {int(classes.max())}]."
            )
        hp = self.hparams
        return masking.decode(
            self.network,
            classes.to(self.device),
            self.layout.tokens,
            self.layout.groups,
            self.network.null_class,
            steps=steps or hp.sample_steps,
            temperature=hp.sample_temperature if temperature is None else temperature,
            choice_temperature=(hp.sample_choice_temperature if choice_temperature is None else choice_temperature),
            cfg=hp.sample_cfg if cfg is None else cfg,
            generator=generator,
        )

    def tokenizer(self):
        """The configured tokenizer (EMA weights), checked against the shards' tokenizer hash."""
        if not self._tokenizer_holder:
            tokenizer = load_tokenizer(self.hparams.tokenizer, "cpu")
            check_same_tokenizer(self.tokenizer_sha256, tokenizer, "the generator's training tokens")
            self._tokenizer_holder.append(tokenizer)
        return self._tokenizer_holder[0].to(self.device)

    def setup(self, stage: str) -> None:
        if self.hparams.tokenizer:
            self.tokenizer()  # refuse a mismatched tokenizer before the first step, not at the first grid

    def log_sample_grid(self) -> None:
        classes = [c for c in self.hparams.grid_classes if c < self.layout.num_classes]
        classes = torch.tensor(classes, device=self.device).repeat_interleave(self.hparams.grid_per_class)
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed)
        ids = self.generate(classes, generator=generator)
        images = self.tokenizer().detokenize(ids, generator=generator, sampler="fast")
        grid = make_grid((images.float().cpu() + 1) / 2, nrow=self.hparams.grid_per_class).clamp(0, 1)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("val/samples", grid, global_step=self.global_step)
