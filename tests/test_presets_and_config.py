import pytest
import torch

from flowmo import FlowMoTokenizer, presets
from flowmo.config import FlowMoConfig, TransformerConfig, fsq_levels_for_bits
from flowmo.nn.tokenizer import official_parameter_count

# method §1.1 / paper Table 6: parameters of the authors' layout (unused encoder adaLN etc. included).
PAPER_PARAMS = {"lo": 945.4e6, "hi": 945.5e6, "small": 517.1e6}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    assert abs(official_parameter_count(presets.get(name)) - PAPER_PARAMS[name]) < 0.1e6


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_our_model_builds_only_parameters_the_forward_pass_uses(name):
    model = FlowMoTokenizer.from_preset(name, device="meta")
    ours = sum(p.numel() for p in model.parameters())
    config = presets.get(name)
    w = config.encoder.width
    # encoder adaLN (2 streams x depth x (6w^2 + 6w)) + time MLP + image head + final adaLN + decoder code head
    unused_encoder = (
        config.encoder.depth * 2 * (6 * w * w + 6 * w)
        + (256 * w + w)
        + (w * w + w)
        + (48 * config.patch_size**2 // 16 * w + 3 * config.patch_size**2)
        + 2 * (2 * w * w + 2 * w)
    )
    wd = config.decoder.width
    unused_decoder = (config.code_dim + 1) * (wd + 1) + (2 * wd * wd + 2 * wd)
    # the last block's update of the stream no head reads: output projection + MLP (ratio 4)
    last_update = lambda width: (width * width + width) + (8 * width * width + 5 * width)  # noqa: E731
    unused_encoder += last_update(w)
    unused_decoder += last_update(wd)
    assert ours + unused_encoder + unused_decoder == official_parameter_count(config)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_preset_names_and_bit_rates():
    assert presets.names() == ["lo", "hi", "small", "tiny", "cpu-mid", "demo"]
    assert presets.get("cpu-mid").bits_per_pixel == pytest.approx(64 * 18 / 64**2)
    assert presets.get("cpu-mid").decoder.head_dim == 32 and presets.get("cpu-mid").groups_per_token == 2
    assert presets.get("demo").bits_per_pixel == pytest.approx(16 * 72 / 32**2)
    assert presets.get("lo").bits_per_pixel == pytest.approx(0.0703, abs=1e-4)
    assert presets.get("hi").bits_per_pixel == pytest.approx(0.2188, abs=1e-4)
    assert presets.get("hi").groups_per_token == 4 and presets.get("lo").groups_per_token == 2
    with pytest.raises(ValueError, match="unknown preset"):
        presets.get("huge")


def test_config_round_trips_through_a_dict():
    config = presets.get("hi")
    assert FlowMoConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(patch_size=5), "not divisible by patch_size 5"),
        (dict(code_dim=20), "code_dim 20 is not divisible by entropy_group_bits 9"),
        (dict(quantizer="vq"), "quantizer must be one of"),
        (dict(quantizer="fsq", fsq_levels=(8, 8)), "code_dim 18 != len\\(fsq_levels\\) 2"),
        (dict(attention_scale="1/d"), "attention_scale must be one of"),
    ],
)
def test_config_errors_name_the_numbers(changes, message):
    with pytest.raises(ValueError, match=message):
        presets.get("tiny").replace(**changes)


def test_transformer_config_checks_heads_and_rope():
    with pytest.raises(ValueError, match="not divisible by heads"):
        TransformerConfig(width=100, depth=1, heads=3, rope_axes=(4, 14, 14))
    with pytest.raises(ValueError, match="sum to 30 but head_dim is 64/2=32"):
        TransformerConfig(width=64, depth=1, heads=2, rope_axes=(2, 14, 14))
    with pytest.raises(ValueError, match="positive and even"):
        TransformerConfig(width=64, depth=1, heads=2, rope_axes=(3, 15, 14))


def test_unknown_config_keys_are_listed():
    with pytest.raises(ValueError, match="unknown FlowMo config keys \\['widht'\\]"):
        FlowMoConfig.from_dict({"widht": 3})


def test_fsq_levels_spend_the_requested_bits():
    for bits in (18, 56, 10):
        levels = fsq_levels_for_bits(bits)
        assert sum(torch.tensor(levels, dtype=torch.float64).log2()) == pytest.approx(bits)
