"""Training losses of both stages (method §3), kept outside the network.

    out = flowmo_loss(tokenizer, images, recipe, perceptual_net, sample_net, generator)
    out.total.backward(); log(out.parts)   # parts: flow, perceptual, sample, entropy, commitment, ...

Stage 1A (mode matching): flow MSE + 0.1 LPIPS-VGG(x, one-step x0 estimate) + 0.0025 entropy
+ 0.000625 commitment. Stage 1B (mode seeking): the same flow MSE + 0.01 ResNet-50-logit MSE between x and
an 8-step Euler sample on a per-sample random grid, back-propagated through the whole chain. Each term is
switched off by a zero weight or a missing network, so the ablations are config changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flowmo import flow
from flowmo.errors import UserError
from flowmo.nn.quantizers import QuantizerLosses


@dataclass
class LossOutput:
    """total: the scalar to back-propagate; parts: detached named terms for logging;
    indices: the token indices of this batch (codebook statistics), None for a continuous code."""

    total: Tensor
    parts: dict[str, Tensor]
    indices: Tensor | None


STAGES = ("1a", "1b")


@dataclass(frozen=True)
class LossRecipe:
    """Every loss weight of a training step, the quantizer's included (method §3). The defaults are Stage 1A of the
    paper; `for_stage` checks a recipe against its stage. A term is off with weight 0 or network "none".

    perceptual: the network of the 1A term on the one-step x0 estimate: lpips_vgg (paper), pixel_mse or none.
    sample_loss: the network of the 1B term on the chain sample: resnet50_logits (paper), pixel_mse or none.
    entropy_weight, commitment_weight: the quantizer's terms (LFQ: MAGVIT-2 entropy and commitment).
    time_schedule: how t is drawn: fat_lognormal (paper: logit-normal with a 10% uniform tail), lognormal,
        uniform or noise_weighted (t = sqrt(U), the CPU demo's).
    cfg_dropout: per-sample probability of the null code (enables CFG at sampling; paper 0.1).
    chain_steps: Euler steps of the 1B chain (paper 8); checkpoint_chain recomputes each of its decoder calls in
        backward (less memory, ~1/3 more compute).
    """

    flow_weight: float = 1.0
    perceptual: str = "lpips_vgg"
    perceptual_weight: float = 0.1
    sample_loss: str = "none"
    sample_weight: float = 0.01
    entropy_weight: float = 0.0025
    commitment_weight: float = 0.000625
    time_schedule: str = "fat_lognormal"
    cfg_dropout: float = 0.1
    chain_steps: int = 8
    checkpoint_chain: bool = True

    def for_stage(self, stage: str) -> "LossRecipe":
        """This recipe for Stage 1A (mode matching: flow + perceptual on the x0 estimate + quantizer) or 1B (mode
        seeking: flow + a loss on the chain sample), a term without a network weighted 0. A term the stage does not
        use is refused, never silently zeroed: set it to none there."""
        if stage not in STAGES:
            raise UserError(f"stage must be one of {STAGES}, got {stage!r}.")
        if stage == "1a" and self.sample_loss != "none":
            raise UserError(
                f"Stage 1A has no chain-sample loss (method §3: it is Stage 1B's term), but model.loss.sample_loss "
                f"is {self.sample_loss!r}; set model.loss.sample_loss none, or model.stage 1b."
            )
        if stage == "1b" and self.perceptual != "none" and self.perceptual_weight:
            raise UserError(
                f"Stage 1B trains no perceptual loss on the x0 estimate (method §3: that is Stage 1A's term), "
                f"but model.loss.perceptual is {self.perceptual!r}; set model.loss.perceptual none, or model.stage 1a."
            )
        return replace(
            self,
            perceptual_weight=self.perceptual_weight if self.perceptual != "none" else 0.0,
            sample_weight=self.sample_weight if self.sample_loss != "none" else 0.0,
        )

    def quantizer_loss(self, losses: QuantizerLosses) -> Tensor:
        """The weighted sum of the quantizer's terms (a quantizer without a term logs it as zero)."""
        return self.entropy_weight * losses.terms["entropy"] + self.commitment_weight * losses.terms["commitment"]


def encoder_trains(tokenizer: nn.Module) -> bool:
    """Whether the encoder is trained: its parameters' requires_grad is the one record of the freeze."""
    return any(p.requires_grad for p in tokenizer.encoder.parameters())


def flow_matching_loss(velocity: Tensor, images: Tensor, noise: Tensor) -> Tensor:
    """mean over batch of mean over C,H,W of (noise - v - x)^2; no time weighting (method §3)."""
    return (flow.velocity_target(images, noise) - velocity).float().pow(2).mean()


def drop_codes(condition: Tensor, probability: float, generator: torch.Generator | None) -> Tensor:
    """Replace each sample's whole condition, mask channel included, by zeros with `probability` (CFG)."""
    if probability <= 0:
        return condition
    keep = torch.rand(condition.shape[0], device=condition.device, generator=generator) >= probability
    return condition * keep[:, None, None].to(condition.dtype)


def chain_sample(
    tokenizer: nn.Module,
    codes: Tensor,
    noise: Tensor,
    steps: int,
    generator: torch.Generator | None,
    use_checkpoint: bool,
) -> Tensor:
    """Stage-1B sample: `steps` Euler steps from noise on a per-sample random grid, no CFG, no clipping.

    Every decoder call is checkpointed non-reentrantly (reentrant checkpointing silently breaks under
    torch.compile, method §8.17), so memory holds one decoder pass at a time instead of eight.
    """
    condition = tokenizer.decoder_condition(codes)
    _, grid = flow.random_chain_timesteps(codes.shape[0], steps, device=codes.device, generator=generator)

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(tokenizer.velocity_from_condition, z, condition, t, use_reentrant=False)
        return tokenizer.velocity_from_condition(z, condition, t)

    return flow.sample_euler(velocity, noise, grid.to(noise.dtype), clip=False)


def flowmo_loss(
    tokenizer: nn.Module,
    images: Tensor,
    recipe: LossRecipe,
    perceptual_net: nn.Module | None = None,
    sample_net: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """One micro-batch of either stage (which terms run is decided by `recipe` and the nets given). A frozen
    encoder (requires_grad off: Stage 1B, 1A after the freeze) runs without grad."""
    batch = images.shape[0]
    train_encoder = encoder_trains(tokenizer)
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        code = tokenizer.encode(images, check=False)
    # A frozen encoder makes the quantizer loss a constant: skip its 2^G-way softmax (16384 wide for Hi).
    quantized = tokenizer.quantize(code, with_losses=train_encoder)
    condition = drop_codes(tokenizer.decoder_condition(quantized.codes), recipe.cfg_dropout, generator)

    t = flow.sample_time(batch, recipe.time_schedule, device=images.device, generator=generator)
    noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
    noisy = flow.interpolate(images, noise, t)
    velocity = tokenizer.velocity_from_condition(noisy, condition, t)

    parts: dict[str, Tensor] = {"flow": flow_matching_loss(velocity, images, noise)}
    total = recipe.flow_weight * parts["flow"]
    if quantized.losses is not None:
        parts.update(quantizer=recipe.quantizer_loss(quantized.losses), **quantized.losses.terms)
        total = total + parts["quantizer"]
    if perceptual_net is not None and recipe.perceptual_weight:
        estimate = flow.x0_estimate(noisy, velocity, t)
        parts["perceptual"] = perceptual_net(images, estimate).float().mean()
        total = total + recipe.perceptual_weight * parts["perceptual"]
    if sample_net is not None and recipe.sample_weight:
        chain_noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
        sample = chain_sample(
            tokenizer, quantized.codes, chain_noise, recipe.chain_steps, generator, recipe.checkpoint_chain
        )
        parts["sample"] = sample_net(images, sample).float().mean()
        total = total + recipe.sample_weight * parts["sample"]
    parts["total"] = total
    return LossOutput(total, {name: value.detach() for name, value in parts.items()}, quantized.indices)
