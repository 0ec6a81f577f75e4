"""FlowMoTokenizer: encoder -> quantizer -> rectified-flow decoder, with the public encode/decode API.

tok = FlowMoTokenizer.from_preset("lo")            # freshly initialised; trained weights: flowmo.from_pretrained("lo")
indices = tok.tokenize(images)                     # images [B, 3, H, W] in [-1, 1] -> int64 [B, L*F]
images = tok.detokenize(indices)                   # flow.SAMPLERS["paper"]: 25 steps, CFG 1.5 on (0.17, 1.02)

Pure torch: no file, download or Lightning code. Weights are read and written outside flowmo.nn (flowmo.checkpoint:
from_checkpoint, from_official; flowmo.hub: from_pretrained, save_pretrained, push_to_hub), which return or take
this module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowmo import flow, official, presets
from flowmo.config import FlowMoConfig
from flowmo.nn.quantizers import QuantizerOutput, build_quantizer
from flowmo.nn.transformer import DecoderTransformer, EncoderTransformer, checkpoint_every

PAPER = flow.SAMPLERS["paper"]  # sample()'s defaults: 25 steps, rho 4, CFG 1.5 on sigma (0.17, 1.02)


class FlowMoTokenizer(nn.Module):
    """The FlowMo network. No dropout anywhere: train() and eval() compute the same function."""

    def __init__(self, config: FlowMoConfig):
        super().__init__()
        self.config = config
        shared = dict(
            patch_size=config.patch_size,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias,
            rope_theta=config.rope_theta,
            attention_scale_spec=config.attention_scale,
        )
        # Encoder: code tokens start as zeros (identity only from RoPE); only its code head is read.
        self.encoder = EncoderTransformer(
            config.encoder,
            code_in_dim=config.code_dim,
            code_out_dim=config.code_dim,
            image_out=False,
            time_conditioned=False,
            **shared,
        )
        # Decoder: reads [code, 1] (the "code present" channel), outputs the velocity image only.
        self.decoder = DecoderTransformer(
            config.decoder,
            code_in_dim=config.code_dim + 1,
            code_out_dim=None,
            image_out=True,
            time_conditioned=True,
            **shared,
        )
        self.quantizer = build_quantizer(config)

    def set_activation_checkpointing(self, setting: str) -> "FlowMoTokenizer":
        """'none', 'blocks' (recompute every block in backward) or 'every_K' (every K-th block), for encoder and
        decoder alike: less activation memory for ~one more forward pass of the recomputed blocks."""
        self.encoder.checkpoint_every = self.decoder.checkpoint_every = checkpoint_every(setting)
        return self

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: FlowMoConfig | dict, device: str | torch.device | None = None) -> "FlowMoTokenizer":
        config = config if isinstance(config, FlowMoConfig) else FlowMoConfig.from_dict(config)
        with torch.device(device or "cpu"):
            return cls(config)

    @classmethod
    def from_preset(cls, name: str, device: str | torch.device | None = None) -> "FlowMoTokenizer":
        """A freshly initialised preset ("tiny", "small", "lo", "hi"); device="meta" allocates nothing."""
        return cls.from_config(presets.get(name), device)

    # ----------------------------------------------------------------------------------- validation
    def check_images(self, images: Tensor, check_range: bool = True) -> None:
        """One clear ValueError per kind of bad input (type, rank, channels, dtype, empty, size, NaN, range)."""
        if not isinstance(images, Tensor):
            raise ValueError(
                f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}; "
                "for numpy use torch.from_numpy(array)."
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must have shape [B, 3, H, W], got {list(images.shape)}; "
                "add a batch dim with images[None] or convert to RGB."
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating point in [-1, 1], got {images.dtype}; "
                "for uint8 use images.float() / 127.5 - 1."
            )
        if images.shape[0] == 0 or images.shape[-2] == 0 or images.shape[-1] == 0:
            raise ValueError(f"images must hold at least one non-empty image, got shape {list(images.shape)}.")
        p = self.config.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {p}; "
                f"resize or crop to a multiple of {p}."
            )
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or Inf values; replace them (e.g. torch.nan_to_num) before encoding.")
        if check_range:
            low, high = images.aminmax()
            if low.item() < -1.001 or high.item() > 1.001:
                raise ValueError(
                    f"images must lie in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]; "
                    "for [0, 1] images use images * 2 - 1."
                )

    def check_indices(self, indices) -> Tensor:
        """Token ids as an int64 tensor [B, N] on the model's device, or one ValueError that says what is wrong.
        Lists and numpy arrays are accepted; N must be the code's id count and every id within the codebook."""
        if not self.quantizer.has_ids:
            raise ValueError(
                f"this tokenizer's code has no token ids (quantizer {self.config.quantizer!r}); use "
                "encode / quantize codes."
            )
        try:
            ids = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"token ids must be an integer tensor, list or numpy array [B, N]; {error}.") from None
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"token ids must be integers, got {ids.dtype}; use ids.long() only if they are whole "
                "numbers written as floats."
            )
        expected = self.ids_per_image
        if ids.dim() != 2 or ids.shape[1] != expected or ids.shape[0] == 0:
            raise ValueError(
                f"token ids must have shape [B, {expected}] (B >= 1) for this tokenizer, got "
                f"{list(ids.shape)}; add a batch dim with ids[None]."
            )
        size = self.quantizer.codebook_size
        if ids.min().item() < 0 or ids.max().item() >= size:
            raise ValueError(
                f"token ids must lie in [0, {size}), got [{ids.min().item()}, {ids.max().item()}]; "
                "they come from another tokenizer or were corrupted."
            )
        return ids.to(device=self.decoder.img_in.weight.device, dtype=torch.long)

    @property
    def ids_per_image(self) -> int:
        """How many token ids one image has: code_length x ids per token (LFQ: its sub-tokens; FSQ: 1)."""
        return self.config.code_length * self.quantizer.ids_per_token

    def _model_dtype(self, images: Tensor) -> Tensor:
        """Half, bfloat16 or float64 images run in the model's own dtype (the API promise: any float dtype)."""
        return images.to(self.decoder.img_in.weight.dtype)

    # ----------------------------------------------------------------------------------- the model
    def encode(self, images: Tensor, check: bool = True) -> Tensor:
        """Continuous code [B, L, D] of images [B, 3, H, W] in [-1, 1] (before quantization)."""
        if check:
            self.check_images(images)
            images = self._model_dtype(images)
        zeros = images.new_zeros(images.shape[0], self.config.code_length, self.config.code_dim)
        _batch_is_dynamic(images, zeros)
        _, code = self.encoder(images, zeros)
        return code

    def quantize(self, code: Tensor, with_losses: bool = True) -> QuantizerOutput:
        """Quantized codes, token indices and (training mode) the quantizer losses."""
        return self.quantizer(code, with_losses=with_losses)

    def decoder_condition(self, codes: Tensor | None, batch: int | None = None, like: Tensor | None = None) -> Tensor:
        """[codes, 1] -> [B, L, D+1]; None gives the null condition: all zeros, mask channel included."""
        if codes is None:
            return like.new_zeros(batch, self.config.code_length, self.config.code_dim + 1)
        return torch.cat([codes, torch.ones_like(codes[..., :1])], dim=-1)

    def velocity_from_condition(self, noisy: Tensor, condition: Tensor, t: Tensor) -> Tensor:
        """Decoder call on a prepared condition [B, L, D+1] (training uses it for CFG dropout).

        The condition takes the image's dtype and t is made a contiguous fp32 vector, so every call reaches the
        compiled decoder with the same guards (autocast's bf16 codes, an expanded scalar t or a column of a
        Stage-1B grid would each compile the decoder again)."""
        condition, t = condition.to(noisy.dtype), t.to(torch.float32).clone()  # clone: stride 1 even at batch 1
        _batch_is_dynamic(noisy, condition, t)
        image_out, _ = self.decoder(noisy, condition, t)
        return image_out

    def velocity(self, noisy: Tensor, codes: Tensor | None, t: Tensor | float) -> Tensor:
        """v_theta(x_t, code, t) ~ noise - x. codes=None means the null (unconditional) code."""
        t = torch.as_tensor(t, dtype=torch.float32, device=noisy.device).expand(noisy.shape[0])
        condition = self.decoder_condition(codes, noisy.shape[0], like=noisy)
        return self.velocity_from_condition(noisy, condition, t)

    def velocity_with_null(self, noisy: Tensor, codes: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(velocity with `codes`, velocity with the null code) from one decoder call on twice the batch: a
        guided sampler step reads the weights once instead of twice."""
        batch = noisy.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=noisy.device).expand(batch)
        condition = torch.cat([self.decoder_condition(codes), self.decoder_condition(None, batch, like=codes)])
        both = self.velocity_from_condition(torch.cat([noisy, noisy]), condition, torch.cat([t, t]))
        return both[:batch], both[batch:]

    def sample(
        self,
        codes: Tensor | None,
        noise: Tensor,
        steps: int = PAPER.steps,
        rho: float = PAPER.rho,
        cfg: float = PAPER.cfg,
        cfg_interval: tuple[float, float] | None = PAPER.cfg_interval,
        timesteps: Tensor | None = None,
        clip: bool = True,
    ) -> Tensor:
        """Decode by Euler integration from `noise` (t=1) to t=0.

        Default grid: t_k = (k/steps)^rho. `timesteps` overrides it ([K+1] or per-sample [B, K+1]).
        cfg_interval is in EDM sigma (the paper's (0.17, 1.02)), converted by t = sigma/(1+sigma);
        None applies guidance at every step.
        """
        return self.sample_with(flow.SamplerSettings(steps, rho, cfg, cfg_interval), codes, noise, timesteps, clip)

    def sample_with(
        self,
        settings: flow.SamplerSettings,
        codes: Tensor | None,
        noise: Tensor,
        timesteps: Tensor | None = None,
        clip: bool = True,
    ) -> Tensor:
        """`sample` with its settings as one SamplerSettings (flow.SAMPLERS["paper"], ["fast"], ...)."""
        self._check_sample_inputs(codes, noise)
        # The grid lives on the noise's device (no copy per step); which steps are guided is decided on the host
        # from the settings (no device sync per step). An explicit per-sample grid decides per sample.
        if timesteps is None:
            grid, guided = settings.timesteps(noise.device), settings.guided_steps()
        else:
            grid, guided = timesteps.to(noise.device), None
        conditional = lambda z, t: self.velocity(z, codes, t)  # noqa: E731
        unconditional = lambda z, t: self.velocity(z, None, t)  # noqa: E731
        paired = lambda z, t: self.velocity_with_null(z, codes, t)  # noqa: E731
        velocity_fn = flow.guided_velocity(
            conditional,
            unconditional,
            settings.cfg,
            settings.interval_t,
            paired=paired if codes is not None else None,
            guided_steps=guided,
        )
        return flow.sample_euler(velocity_fn, noise, grid, clip=clip)

    def _check_sample_inputs(self, codes: Tensor | None, noise: Tensor) -> None:
        """Shapes only (no device sync: validation and evaluation call this for every batch)."""
        if not isinstance(noise, Tensor) or noise.dim() != 4 or noise.shape[1] != 3 or not noise.is_floating_point():
            raise ValueError("noise must be a float tensor [B, 3, H, W] (the image shape to decode).")
        expected = (noise.shape[0], self.config.code_length, self.config.code_dim)
        if codes is not None and (not isinstance(codes, Tensor) or tuple(codes.shape) != expected):
            shape = list(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"codes must have shape {list(expected)} (one code per noise image), got {shape}.")

    # ----------------------------------------------------------------------------------- downstream API
    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> int64 token indices ([B, L*F] for LFQ, [B, L] for FSQ)."""
        out = self.quantize(self.encode(images), with_losses=False)
        if out.indices is None:
            raise ValueError(
                "this tokenizer has no token ids (a continuous code, or FSQ levels whose product exceeds "
                "an int64 id); use encode() and quantize() instead."
            )
        return out.indices

    @torch.no_grad()
    def detokenize(
        self,
        indices: Tensor,
        noise: Tensor | None = None,
        image_size: tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
        sampler: str | flow.SamplerSettings = "paper",
        **overrides,
    ) -> Tensor:
        """int64 token indices -> images [B, 3, H, W] in [-1, 1]. sampler: "paper" (25 steps, 31 NFE), "fast"
        (8 steps, 10 NFE) or a SamplerSettings; keyword overrides (steps, rho, cfg, cfg_interval) change single
        settings."""
        settings = _settings(sampler, overrides)
        indices = self.check_indices(indices)
        codes = self.quantizer.indices_to_codes(indices).to(self.decoder.img_in.weight.dtype)
        if noise is not None:
            self.check_images(noise, check_range=False)
            if noise.shape[0] != indices.shape[0]:
                raise ValueError(f"noise has {noise.shape[0]} images for {indices.shape[0]} rows of token ids.")
            noise = self._model_dtype(noise)
        if noise is None:
            height, width = image_size or (self.config.image_size, self.config.image_size)
            if height <= 0 or width <= 0 or height % self.config.patch_size or width % self.config.patch_size:
                raise ValueError(
                    f"image_size {(height, width)} must be positive multiples of the patch size "
                    f"{self.config.patch_size}."
                )
            noise = torch.randn(
                indices.shape[0], 3, height, width, device=indices.device, dtype=codes.dtype, generator=generator
            )
        return self.sample_with(settings, codes, noise)

    @torch.no_grad()
    def reconstruct(
        self,
        images: Tensor,
        generator: torch.Generator | None = None,
        sampler: str | flow.SamplerSettings = "paper",
        **overrides,
    ) -> Tensor:
        """encode -> quantize -> decode with the named sampler ("paper" or "fast", as detokenize)."""
        settings = _settings(sampler, overrides)
        codes = self.quantize(self.encode(images), with_losses=False).codes
        noise = torch.randn(images.shape, device=images.device, dtype=codes.dtype, generator=generator)
        return self.sample_with(settings, codes, noise)


def _settings(sampler: str | flow.SamplerSettings, overrides: dict) -> flow.SamplerSettings:
    if isinstance(sampler, flow.SamplerSettings):
        return sampler.replace(**overrides)
    return flow.sampler_settings(sampler, **overrides)


def official_shapes(config: FlowMoConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official state dict for `config`, with its shape: ours under the authors' names (built on
    the meta device, no memory) plus the unused ones they also saved."""
    model = FlowMoTokenizer.from_config(config, device="meta")
    shapes = {official.ours_to_official(k): tuple(v.shape) for k, v in model.state_dict().items()}
    return {**shapes, **official.dropped_official_shapes(config)}


def official_parameter_count(config: FlowMoConfig) -> int:
    """Parameters of the authors' module layout (the paper's 945M / 517M), unused ones included."""
    return sum(int(torch.Size(shape).numel()) for shape in official_shapes(config).values())


def _batch_is_dynamic(*tensors: Tensor) -> None:
    """Tell torch.compile up front that the batch size varies (B and 2B of a guided step, a last partial batch), so
    the first graph already takes any batch instead of a recompile at the first new size. No effect in eager."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
