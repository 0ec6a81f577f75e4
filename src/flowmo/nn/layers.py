"""Building blocks of the FlowMo MMDiT (method §1.2): time embedding, QK-RMSNorm, modulation,
the double-stream block and the final layer.

Each stream's layers are grouped (`img.attn.qkv`, `img.mlp.0`, ...); the authors' checkpoints name the
same tensors `img_attn.qkv`, `img_mlp.0`, ... and flowmo/official.py maps one onto the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from flowmo.nn.rope import rotate

LN_EPS = 1e-6


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of 1000*t, [cos, sin] order (method §8.8). t: [B] -> [B, dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; embeds the sinusoidal time features into the model width."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm over the head dim with a learnable scale, computed and returned in fp32 (method §8.21).

    q and k stay in fp32 from here through RoPE and are cast to the attention dtype once, after RoPE:
    under bf16 autocast that saves three casts per tensor against rounding between the two steps."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused kernel: x * rsqrt(mean(x^2) + eps) * scale as before (bit-identical on CPU here), at about
        # half the time forward and three quarters with backward. Autocast off: the result must stay fp32.
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x.float(), self.scale.shape, self.scale.float(), self.eps)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


class StreamAttention(nn.Module):
    """The per-stream half of joint attention: qkv projection + QK-norm in, output projection out."""

    def __init__(self, width: int, heads: int, qkv_bias: bool, with_proj: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.norm = QKNorm(width // heads)
        self.proj = nn.Linear(width, width) if with_proj else None

    def qkv_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h [B, N, W] -> q, k (fp32, normed), v, each [B, heads, N, head_dim]; qkv rows are (3, heads, head_dim)."""
        q, k, v = rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = self.norm(q, k)
        return q, k, v


def joint_attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], scale: float) -> Tensor:
    """RoPE (fp32; `rope` = the pairwise [N, head_dim] tables) then full bidirectional SDPA over the joint
    sequence in v's dtype. [B, H, N, D] -> same."""
    cos, sin = rope
    q, k = rotate(q, cos, sin, v.dtype), rotate(k, cos, sin, v.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def merge_heads(x: Tensor) -> Tensor:
    return rearrange(x, "b h n d -> b n (h d)")


class Modulation(nn.Module):
    """adaLN: SiLU(vec) -> Linear -> (shift, scale, gate) for attention and for the MLP.

    The gate rows start at zero (method §1.2), so every block starts as the identity of its stream.
    """

    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, 6 * width)
        with torch.no_grad():
            for gate_chunk in (2, 5):
                self.lin.weight[gate_chunk * width : (gate_chunk + 1) * width].zero_()
                self.lin.bias[gate_chunk * width : (gate_chunk + 1) * width].zero_()

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(6, dim=-1)  # 6 x [B, 1, W]
        return chunks[:3], chunks[3:]


def modulate(x: Tensor, shift: Tensor | None, scale: Tensor | None) -> Tensor:
    """LayerNorm without affine, then (1 + scale) * x + shift (one fused multiply-add kernel).

    CUDA autocast runs layer_norm in fp32 and returns fp32; the result is cast back to x's dtype (a no-op in fp32
    training), so the multiply-add is not promoted to fp32 and saves a bf16 tensor for backward instead of an fp32
    one: the statistics are still computed in fp32, and the next Linear would round to bf16 anyway."""
    normed = F.layer_norm(x, x.shape[-1:], eps=LN_EPS).to(x.dtype)
    return normed if shift is None else torch.addcmul(shift, normed, 1 + scale)


def gated_add(h: Tensor, gate: Tensor | None, update: Tensor) -> Tensor:
    """h + gate * update in one kernel (h + update without a gate: the encoder)."""
    return h + update if gate is None else torch.addcmul(h, gate, update)


class StreamBlockHalf(nn.Module):
    """One stream (image or code tokens) of a double block: its modulation, attention half and MLP.

    `has_output=False` (the last block of a stream nobody reads: the encoder's image stream, the decoder's
    code stream) keeps only what feeds the joint attention (q, k, v): its projection and MLP could never
    receive a gradient."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, qkv_bias: bool, modulated: bool, has_output: bool = True
    ):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.mod = Modulation(width) if modulated else None
        self.attn = StreamAttention(width, heads, qkv_bias, with_proj=has_output)
        self.mlp = (
            nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
            if has_output
            else None
        )


class DoubleStreamBlock(nn.Module):
    """MMDiT block: separate weights per stream, one joint attention over [code tokens; image tokens].

    Without a conditioning vector (`modulated=False`, the encoder) shift=scale=0 and gate=1: a plain
    pre-LN dual-stream transformer. Such a block builds no modulation layers at all, and a last block builds
    no output layers for a stream nobody reads, so no parameter is left without a gradient (DDP needs no
    find_unused_parameters; the authors' checkpoints carry these tensors and the loader drops them).
    A stream without output returns None.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        modulated: bool,
        attn_scale: float,
        img_output: bool = True,
        txt_output: bool = True,
    ):
        super().__init__()
        self.attn_scale = attn_scale
        self.img = StreamBlockHalf(width, heads, mlp_ratio, qkv_bias, modulated, has_output=img_output)
        self.txt = StreamBlockHalf(width, heads, mlp_ratio, qkv_bias, modulated, has_output=txt_output)

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor | None, rope: tuple[Tensor, Tensor]
    ) -> tuple[Tensor | None, Tensor | None]:
        no_mod = ((None, None, None), (None, None, None))
        img_mod = self.img.mod(vec) if self.img.mod is not None else no_mod
        txt_mod = self.txt.mod(vec) if self.txt.mod is not None else no_mod
        img_q, img_k, img_v = self.img.attn.qkv_heads(modulate(img, *img_mod[0][:2]))
        txt_q, txt_k, txt_v = self.txt.attn.qkv_heads(modulate(txt, *txt_mod[0][:2]))
        attn = joint_attention(
            torch.cat((txt_q, img_q), dim=2),
            torch.cat((txt_k, img_k), dim=2),
            torch.cat((txt_v, img_v), dim=2),
            rope,
            self.attn_scale,
        )
        # split the streams before merging heads: one copy per stream instead of a merge copy plus a slice copy
        img = _residual(img, self.img, attn[:, :, txt.shape[1] :], img_mod)
        txt = _residual(txt, self.txt, attn[:, :, : txt.shape[1]], txt_mod)
        return img, txt


def _residual(h: Tensor, stream: StreamBlockHalf, attn_heads: Tensor, mod) -> Tensor | None:
    """h + gate1 proj(attention) then + gate2 MLP; attn_heads is this stream's [B, H, N, D] slice."""
    if stream.mlp is None:
        return None
    attn_out = merge_heads(attn_heads)
    (_, _, gate1), (shift2, scale2, gate2) = mod
    h = gated_add(h, gate1, stream.attn.proj(attn_out))
    return gated_add(h, gate2, stream.mlp(modulate(h, shift2, scale2)))


class FinalLayer(nn.Module):
    """Output head of one stream. Time-conditioned: adaLN, then LayerNorm again, then Linear (method §8.5)."""

    def __init__(self, width: int, out_dim: int, time_conditioned: bool):
        super().__init__()
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width)) if time_conditioned else None

    def forward(self, x: Tensor, vec: Tensor | None) -> Tensor:
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=LN_EPS))
