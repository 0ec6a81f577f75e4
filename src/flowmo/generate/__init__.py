"""Generation on FlowMo tokens: token shards (`flowmo pretokenize`), a class-conditional MaskGIT
(`MaskGITModule`, `flowmo gen fit`), sampling (`flowmo generate`) and gFID / IS / precision / recall."""

from flowmo.generate.config import MaskGITConfig, TokenLayout
from flowmo.generate.masking import cosine_mask_ratio, decode, masked_counts, training_mask
from flowmo.generate.module import MaskGITModule
from flowmo.generate.network import MaskGITTransformer

__all__ = [
    "MaskGITConfig",
    "MaskGITModule",
    "MaskGITTransformer",
    "TokenLayout",
    "cosine_mask_ratio",
    "decode",
    "masked_counts",
    "training_mask",
]
