"""The shared FlowMo transformer (the authors' "Flux" class, method §1.2), used as encoder and decoder.

Inputs are an image [B, 3, H, W] (the image stream, patchified) and code tokens [B, L, C_in] (the
"txt" stream), plus an optional time t [B]. Both streams meet only in joint attention.
"""

from __future__ import annotations

import functools
import re

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from flowmo.config import TransformerConfig
from flowmo.nn.layers import DoubleStreamBlock, FinalLayer, MLPEmbedder, timestep_embedding
from flowmo.nn.rope import pairwise_tables, rope_angles, token_positions

TIME_EMBED_DIM = 256


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C], patch vector ordered (ph, pw, c): channel fastest (method §8.22)."""
    return rearrange(images, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=patch_size, pw=patch_size)


def unpatchify(tokens: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Inverse of `patchify`: [B, (H/p)*(W/p), p*p*C] -> [B, C, H, W]."""
    return rearrange(
        tokens, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=height // patch_size, ph=patch_size, pw=patch_size
    )


def attention_scale(spec: str, head_dim: int) -> float:
    """8/head_dim is the muP-style scale of the released code (method §8.4); 1/sqrt(d) for experiments."""
    return 8.0 / head_dim if spec == "8/head_dim" else head_dim**-0.5


class MMDiT(nn.Module):
    """Dual-stream transformer over [code tokens; image patches].

    time_conditioned: the decoder (adaLN from t); the encoder has none.
    image_out_dim / code_out_dim: which output heads exist. The encoder reads only its code head and
    the decoder only its image head, so each builds only the head it uses.
    """

    def __init__(
        self,
        arch: TransformerConfig,
        *,
        patch_size: int,
        code_in_dim: int,
        code_out_dim: int | None,
        image_out: bool,
        time_conditioned: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        rope_theta: float = 10000.0,
        attention_scale_spec: str = "8/head_dim",
    ):
        super().__init__()
        self.patch_size = patch_size
        self.rope_axes = arch.rope_axes
        self.rope_theta = rope_theta
        patch_dim = 3 * patch_size * patch_size
        self.img_in = nn.Linear(patch_dim, arch.width)
        self.txt_in = nn.Linear(code_in_dim, arch.width)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, arch.width) if time_conditioned else None
        scale = attention_scale(attention_scale_spec, arch.head_dim)
        # The last block's output of a stream without a head is never read: that stream builds no proj/MLP there.
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(
                arch.width,
                arch.heads,
                mlp_ratio,
                qkv_bias,
                time_conditioned,
                scale,
                img_output=image_out or index < arch.depth - 1,
                txt_output=bool(code_out_dim) or index < arch.depth - 1,
            )
            for index in range(arch.depth)
        )
        self.final_layer_img = FinalLayer(arch.width, patch_dim, time_conditioned) if image_out else None
        self.final_layer_txt = FinalLayer(arch.width, code_out_dim, time_conditioned) if code_out_dim else None
        self.checkpoint_every = (
            0  # activation checkpointing: 0 none, k = every k-th block (set_activation_checkpointing)
        )

    def rope(self, code_length: int, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        return _cached_rope(
            code_length,
            height // self.patch_size,
            width // self.patch_size,
            self.rope_axes,
            self.rope_theta,
            str(device),
        )

    def forward(
        self, images: Tensor, code_tokens: Tensor, t: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Returns (image output [B, 3, H, W] or None, code output [B, L, code_out_dim] or None)."""
        height, width = images.shape[-2:]
        img = self.img_in(patchify(images, self.patch_size))  # [B, N_img, W]
        txt = self.txt_in(code_tokens)  # [B, L, W]
        vec = self.time_in(timestep_embedding(t, TIME_EMBED_DIM).to(img.dtype)) if self.time_in is not None else None
        rope = self.rope(code_tokens.shape[1], height, width, images.device)
        for index, block in enumerate(self.double_blocks):
            if self._recompute(index):  # keep only the block's inputs; its activations are recomputed in backward
                img, txt = checkpoint(block, img, txt, vec, rope, use_reentrant=False)
            else:
                img, txt = block(img, txt, vec, rope)
        image_out = None
        if self.final_layer_img is not None:
            image_out = unpatchify(self.final_layer_img(img, vec), self.patch_size, height, width)
        code_out = self.final_layer_txt(txt, vec) if self.final_layer_txt is not None else None
        return image_out, code_out

    def _recompute(self, index: int) -> bool:
        return bool(self.checkpoint_every) and index % self.checkpoint_every == 0 and torch.is_grad_enabled()


class EncoderTransformer(MMDiT):
    """The encoder's MMDiT. A forward of its own gives torch.compile a recompile budget of its own: dynamo counts
    recompiles per code object, and one shared MMDiT.forward pooled the encoder's and the decoder's graphs."""

    def forward(self, images: Tensor, code_tokens: Tensor, t: Tensor | None = None):
        return super().forward(images, code_tokens, t)


class DecoderTransformer(MMDiT):
    """The decoder's MMDiT (see EncoderTransformer)."""

    def forward(self, images: Tensor, code_tokens: Tensor, t: Tensor | None = None):
        return super().forward(images, code_tokens, t)


def checkpoint_every(setting: str) -> int:
    """'none' -> 0, 'blocks' -> 1 (every block), 'every_2' / 'every_3' ... -> every k-th block (k >= 2)."""
    if setting == "none":
        return 0
    if setting == "blocks":
        return 1
    match = re.fullmatch(r"every_(\d+)", setting)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"activation_checkpointing must be none, blocks or every_K (e.g. every_2), got {setting!r}.")
    return int(match.group(1))


@functools.lru_cache(maxsize=16)
def _cached_rope(code_length: int, grid_h: int, grid_w: int, axes: tuple[int, ...], theta: float, device: str):
    """Pairwise RoPE tables (cos, sin), each [N, head_dim] (rope.pairwise_tables): they depend only on the
    geometry, so every forward pass of that geometry shares them.

    Built outside inference mode: a table first made during validation is later saved for backward.
    """
    with torch.inference_mode(False), torch.no_grad():
        positions = token_positions(code_length, grid_h, grid_w, device=torch.device(device))
        return pairwise_tables(*rope_angles(positions, axes, theta))
