"""The quantizer contract (flowmo.nn.quantizers.Quantizer): every registered quantizer answers for its ids, vocabulary
and bits, its loss breakdown is immutable, and no caller outside the config, the presets and the quantizer module
asks for a quantizer by name or probes it with getattr."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from flowmo.config import QUANTIZERS as CONFIG_NAMES
from flowmo.config import FlowMoConfig
from flowmo.nn.quantizers import QUANTIZERS, Quantizer, QuantizerLosses, build_quantizer

SRC = Path(__file__).resolve().parents[1] / "src" / "flowmo"
MAY_NAME_QUANTIZERS = {"config.py", "presets.py", "nn/quantizers.py"}
CONFIGS = {
    "lfq": dict(code_dim=18, entropy_group_bits=9),
    "fsq": dict(code_dim=4, fsq_levels=(8, 5, 5, 5)),
    "none": dict(code_dim=6),
}


def built(name: str) -> tuple[FlowMoConfig, Quantizer]:
    config = FlowMoConfig(image_size=32, patch_size=8, code_length=4, quantizer=name, **CONFIGS[name])
    return config, build_quantizer(config)


def test_the_registry_is_the_config_names():
    assert set(QUANTIZERS) == set(CONFIG_NAMES) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_quantizer_answers_for_its_ids_vocabulary_and_bits(name):
    config, quantizer = built(name)
    assert isinstance(quantizer, Quantizer) and quantizer.code_dim == config.code_dim
    assert quantizer.bits_per_token == config.bits_per_token
    code = torch.randn(3, config.code_length, config.code_dim)
    out = quantizer(code)
    assert out.codes.shape == code.shape and isinstance(out.losses, QuantizerLosses)
    assert set(out.losses.terms) >= {"entropy", "commitment"}
    if not quantizer.has_ids:
        assert out.indices is None and quantizer.ids_per_token == 0
        with pytest.raises(ValueError, match="no token ids"):
            quantizer.indices_to_codes(torch.zeros(3, 4, dtype=torch.long))
        return
    assert out.indices.shape == (3, config.code_length * quantizer.ids_per_token)
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < quantizer.codebook_size
    assert torch.equal(quantizer.indices_to_codes(out.indices), out.codes.detach())


def test_lfq_ids_are_bit_words_fsq_ids_are_not():
    lfq, fsq = built("lfq")[1], built("fsq")[1]
    assert (lfq.ids_per_token, lfq.codebook_size, lfq.id_bits) == (2, 512, 9)
    assert (fsq.ids_per_token, fsq.codebook_size, fsq.id_bits) == (1, 1000, None)


def test_the_loss_breakdown_is_immutable():
    out = built("lfq")[1](torch.randn(2, 4, 18))
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.losses = None
    with pytest.raises(TypeError):
        out.losses.terms["entropy"] = torch.zeros(())
    assert out.entropy_loss is out.losses.terms["entropy"] and set(out.losses.terms) >= {"entropy", "commitment"}


def test_no_caller_names_or_probes_a_quantizer():
    """Outside config.py, presets.py and nn/quantizers.py: no `quantizer == "lfq"`-style comparison, no
    getattr(quantizer, ...) probe, no isinstance check against a quantizer class."""
    pattern = re.compile(
        r"quantizer\s*(==|!=|in\b|not in\b)\s*[\"'(]|getattr\([^)]*quantizer|"
        r"isinstance\([^)]*\b(LFQ|FSQ|ContinuousCode)\b"
    )
    found = [
        f"{path.relative_to(SRC)}:{number}"
        for path in SRC.rglob("*.py")
        if str(path.relative_to(SRC)) not in MAY_NAME_QUANTIZERS
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
