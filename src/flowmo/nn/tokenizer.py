"""FlowMoTokenizer: encoder -> quantizer -> rectified-flow decoder, with the public encode/decode API.

    tok = FlowMoTokenizer.from_preset("lo")            # or .from_official(path) / .from_checkpoint(path)
    indices = tok.tokenize(images)                     # images [B, 3, H, W] in [-1, 1] -> int64 [B, L*F]
    images = tok.detokenize(indices)                   # 25-step rho=4 sampler, CFG 1.5 on (0.17, 1.02)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from flowmo import flow, presets
from flowmo.config import FlowMoConfig
from flowmo.nn.quantizers import QuantizerOutput, build_quantizer
from flowmo.nn.transformer import MMDiT

PAPER_SAMPLER = dict(steps=25, rho=4.0, cfg=1.5, cfg_interval=(0.17, 1.02))


class FlowMoTokenizer(nn.Module):
    """The FlowMo network. No dropout anywhere: train() and eval() compute the same function."""

    def __init__(self, config: FlowMoConfig):
        super().__init__()
        self.config = config
        shared = dict(patch_size=config.patch_size, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias,
                      rope_theta=config.rope_theta, attention_scale_spec=config.attention_scale)
        # Encoder: code tokens start as zeros (identity only from RoPE); only its code head is read.
        self.encoder = MMDiT(config.encoder, code_in_dim=config.code_dim, code_out_dim=config.code_dim,
                             image_out=False, time_conditioned=False, **shared)
        # Decoder: reads [code, 1] (the "code present" channel), outputs the velocity image only.
        self.decoder = MMDiT(config.decoder, code_in_dim=config.code_dim + 1, code_out_dim=None,
                             image_out=True, time_conditioned=True, **shared)
        self.quantizer = build_quantizer(config)

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

    @classmethod
    def from_official(cls, state_dict: dict | str | Path, config: FlowMoConfig | dict | str | None = None,
                      weights: str = "ema") -> "FlowMoTokenizer":
        """Load the authors' weights: a state dict, or a released file (flowmo_lo.pth / flowmo_hi.pth).

        config: FlowMoConfig, the fixtures' dict schema, a preset name, or None to infer lo/hi from the
        tensor shapes. weights: "ema" (what the paper evaluates) or "raw" for released files holding both.
        """
        from flowmo.official import load_official

        return load_official(cls, state_dict, config, weights)

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema", map_location="cpu") -> "FlowMoTokenizer":
        """Load a tokenizer trained by this package (a Lightning .ckpt or an exported .pt)."""
        from flowmo.checkpoint import load_tokenizer_checkpoint

        return load_tokenizer_checkpoint(cls, path, weights, map_location)

    # ----------------------------------------------------------------------------------- validation
    def check_images(self, images: Tensor, check_range: bool = True) -> None:
        """One clear ValueError per kind of bad input (wrong type, rank, channels, dtype, size, range)."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}.")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {list(images.shape)}; "
                             "add a batch dim with images[None] or convert to RGB.")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}; "
                             "for uint8 use images.float() / 127.5 - 1.")
        p = self.config.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {p}; "
                             f"resize or crop to a multiple of {p}.")
        if check_range and images.numel():
            low, high = images.aminmax()
            if low.item() < -1.001 or high.item() > 1.001:
                raise ValueError(f"images must lie in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]; "
                                 "for [0, 1] images use images * 2 - 1.")

    # ----------------------------------------------------------------------------------- the model
    def encode(self, images: Tensor, check: bool = True) -> Tensor:
        """Continuous code [B, L, D] of images [B, 3, H, W] in [-1, 1] (before quantization)."""
        if check:
            self.check_images(images)
        zeros = images.new_zeros(images.shape[0], self.config.code_length, self.config.code_dim)
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
        """Decoder call on a prepared condition [B, L, D+1] (training uses it for CFG dropout)."""
        image_out, _ = self.decoder(noisy, condition, t)
        return image_out

    def velocity(self, noisy: Tensor, codes: Tensor | None, t: Tensor | float) -> Tensor:
        """v_theta(x_t, code, t) ~ noise - x. codes=None means the null (unconditional) code."""
        t = torch.as_tensor(t, dtype=torch.float32, device=noisy.device).expand(noisy.shape[0])
        condition = self.decoder_condition(codes, noisy.shape[0], like=noisy)
        return self.velocity_from_condition(noisy, condition, t)

    def sample(self, codes: Tensor | None, noise: Tensor, steps: int = 25, rho: float = 4.0, cfg: float = 1.5,
               cfg_interval: tuple[float, float] | None = (0.17, 1.02), timesteps: Tensor | None = None,
               clip: bool = True) -> Tensor:
        """Decode by Euler integration from `noise` (t=1) to t=0.

        Default grid: t_k = (k/steps)^rho. `timesteps` overrides it ([K+1] or per-sample [B, K+1]).
        cfg_interval is in EDM sigma (the paper's (0.17, 1.02)), converted by t = sigma/(1+sigma);
        None applies guidance at every step.
        """
        # the shared grid stays on the host: deciding which steps are guided then needs no device sync
        grid = timesteps if timesteps is not None else flow.rho_timesteps(steps, rho)
        interval_t = None if cfg_interval is None else tuple(flow.sigma_to_t(s) for s in cfg_interval)
        conditional = lambda z, t: self.velocity(z, codes, t)  # noqa: E731
        unconditional = lambda z, t: self.velocity(z, None, t)  # noqa: E731
        velocity_fn = flow.guided_velocity(conditional, unconditional, cfg, interval_t)
        return flow.sample_euler(velocity_fn, noise, grid, clip=clip)

    # ----------------------------------------------------------------------------------- downstream API
    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> int64 token indices ([B, L*F] for LFQ, [B, L] for FSQ)."""
        out = self.quantize(self.encode(images), with_losses=False)
        if out.indices is None:
            raise ValueError("this tokenizer has a continuous code (quantizer 'none'); use encode() instead.")
        return out.indices

    @torch.no_grad()
    def detokenize(self, indices: Tensor, noise: Tensor | None = None, image_size: tuple[int, int] | None = None,
                   generator: torch.Generator | None = None, **sampler) -> Tensor:
        """int64 token indices -> images [B, 3, H, W] in [-1, 1] (paper sampler unless overridden)."""
        codes = self.quantizer.indices_to_codes(indices.long()).to(self.decoder.img_in.weight.dtype)
        if noise is None:
            height, width = image_size or (self.config.image_size, self.config.image_size)
            noise = torch.randn(indices.shape[0], 3, height, width, device=indices.device,
                                dtype=codes.dtype, generator=generator)
        return self.sample(codes, noise, **{**PAPER_SAMPLER, **sampler})

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None, **sampler) -> Tensor:
        """encode -> quantize -> decode with the paper's sampler."""
        codes = self.quantize(self.encode(images), with_losses=False).codes
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
        return self.sample(codes, noise, **{**PAPER_SAMPLER, **sampler})
