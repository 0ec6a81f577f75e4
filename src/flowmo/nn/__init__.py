"""Pure-torch FlowMo network (no Lightning, no data): attention + RoPE, MMDiT, quantizers, tokenizer."""

from flowmo.nn.quantizers import (
    FSQ,
    LFQ,
    QUANTIZERS,
    ContinuousCode,
    Quantizer,
    QuantizerLosses,
    QuantizerOutput,
    build_quantizer,
)
from flowmo.nn.tokenizer import FlowMoTokenizer
from flowmo.nn.transformer import MMDiT, patchify, unpatchify

__all__ = [
    "FSQ",
    "LFQ",
    "QUANTIZERS",
    "ContinuousCode",
    "Quantizer",
    "QuantizerLosses",
    "QuantizerOutput",
    "build_quantizer",
    "FlowMoTokenizer",
    "MMDiT",
    "patchify",
    "unpatchify",
]
