"""The MaskGIT transformer over FlowMo tokens (pure torch, no Lightning).

Each sequence position is one whole FlowMo token. Its F sub-token ids each have their own embedding table (the
embeddings are summed) and their own output head, so a 2^18-id Lo token costs 2 x 2^9 rows instead of 2^18
(method §2: sub-token p = tau*F + k of token tau). A masked token is replaced as a whole by one learned
mask embedding. The class sits in front of the sequence as one extra position; class id `num_classes` is the
learned null class of classifier-free guidance.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from flowmo.generate.config import MaskGITConfig, TokenLayout


class MaskGITTransformer(nn.Module):
    """ids [B, L*F] (int64), masked [B, L] (bool), classes [B] -> logits [B, L, F, V]."""

    def __init__(self, config: MaskGITConfig, layout: TokenLayout):
        super().__init__()
        self.config, self.layout = config, layout
        width, groups, vocab = config.width, layout.groups, layout.codebook_size
        # F tables of V rows stored as one table of F*V rows: sub-token k of a token reads rows k*V .. k*V+V-1
        self.sub_token_embedding = nn.Embedding(groups * vocab, width)
        self.register_buffer("table_offsets", torch.arange(groups) * vocab, persistent=False)
        self.mask_embedding = nn.Parameter(torch.zeros(width))
        self.class_embedding = nn.Embedding(layout.num_classes + 1, width)  # + the null class
        self.position_embedding = nn.Parameter(torch.zeros(1 + layout.tokens, width))
        block = nn.TransformerEncoderLayer(
            width,
            config.heads,
            int(width * config.mlp_ratio),
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(block, config.depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        # F heads of V logits stored as one Linear of F*V outputs (one matmul instead of F)
        self.heads = nn.Linear(width, groups * vocab)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.layout.num_classes

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) as MaskGIT (section 4.1); zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for parameter in (self.mask_embedding, self.position_embedding):
            nn.init.trunc_normal_(parameter, std=0.02)

    def embed_tokens(self, ids: Tensor, masked: Tensor) -> Tensor:
        """ids [B, L*F], masked [B, L] -> [B, L, W]: the sum of the F sub-token embeddings, or the mask embedding."""
        sub_ids = rearrange(ids, "b (l f) -> b l f", f=self.layout.groups) + self.table_offsets
        summed = self.sub_token_embedding(sub_ids).sum(dim=2)
        return torch.where(masked[..., None], self.mask_embedding.to(summed.dtype), summed)

    def forward(self, ids: Tensor, masked: Tensor, classes: Tensor) -> Tensor:
        tokens = self.embed_tokens(ids, masked)
        sequence = torch.cat([self.class_embedding(classes)[:, None], tokens], dim=1) + self.position_embedding
        hidden = self.blocks(sequence)[:, 1:]  # drop the class position: it predicts nothing
        logits = self.heads(hidden)  # [B, L, F*V]
        return rearrange(logits, "b l (f v) -> b l f v", f=self.layout.groups)
