"""The project's FlowMo reproduces the authors' implementation: every tensor of official_tiny_a.pt."""

import pytest
import torch

from flowmo import FlowMoTokenizer, flow, from_official
from flowmo.losses import LossRecipe
from flowmo.nn.tokenizer import official_shapes
from flowmo.official import dropped_official_shapes, ours_to_official

TOL = 1e-4


def close(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g} > {TOL}"


@pytest.fixture(scope="module")
def reference(official_fixture):
    tok = from_official(official_fixture["official_state_dict"], official_fixture["config"])
    return tok.eval(), official_fixture


def test_encoder_quantizer_and_indices(reference):
    tok, ref = reference
    code = tok.encode(ref["images"])
    close(code, ref["encoder_code"])
    tok.train()
    q = tok.quantize(code)
    assert torch.equal(q.codes, ref["quantized_code"])
    assert q.indices.dtype == torch.int64 and torch.equal(q.indices, ref["token_indices"])
    for name in ("per_sample_entropy", "codebook_entropy", "entropy_loss", "commitment_loss"):
        close(getattr(q, name), ref[name])
    recipe = LossRecipe(
        entropy_weight=ref["config"]["entropy_loss_weight"], commitment_weight=ref["config"]["commit_loss_weight"]
    )
    close(recipe.quantizer_loss(q.losses), ref["quantizer_loss"])  # the weights belong to the training recipe
    assert torch.equal(tok.tokenize(ref["images"]), ref["token_indices"])


def test_flow_terms_and_velocity(reference):
    tok, ref = reference
    close(flow.interpolate(ref["images"], ref["noise"], ref["t"]), ref["noisy_images"])
    velocity = tok.velocity(ref["noisy_images"], ref["quantized_code"], ref["t"])
    close(velocity, ref["velocity"])
    close(tok.velocity(ref["noisy_images"], None, ref["t"]), ref["velocity_null_code"])
    flow_loss = (ref["noise"] - velocity - ref["images"]).pow(2).mean()
    close(flow_loss, ref["flow_loss"])
    close(flow.x0_estimate(ref["noisy_images"], velocity, ref["t"]), ref["x0_estimate"])


def test_samplers(reference):
    tok, ref = reference
    codes, noise = ref["quantized_code"], ref["sampler_noise"]
    settings = ref["sample_shifted_cfg_settings"]
    shifted = tok.sample(
        codes,
        noise,
        steps=settings["steps"],
        rho=settings["rho"],
        cfg=settings["cfg"],
        cfg_interval=tuple(settings["cfg_interval_sigma"]),
    )
    close(shifted, ref["sample_shifted_cfg"])
    linear = tok.sample(codes, noise, steps=10, rho=1.0, cfg=1.0)
    close(linear, ref["sample_linear_nocfg"])


def test_posttrain_chain(reference):
    tok, ref = reference
    _, grid = flow.random_chain_timesteps(2, 8, u=ref["posttrain_chain_u"])
    close(grid, ref["posttrain_chain_t"])
    chain = tok.sample(ref["quantized_code"], ref["sampler_noise"], timesteps=grid, cfg=1.0, clip=False)
    close(chain, ref["posttrain_chain_sample"])


def test_train_and_eval_compute_the_same(reference):
    tok, ref = reference
    tok.train()
    train_code = tok.encode(ref["images"])
    train_v = tok.velocity(ref["noisy_images"], ref["quantized_code"], ref["t"])
    tok.eval()
    assert torch.equal(train_code, tok.encode(ref["images"]))
    assert torch.equal(train_v, tok.velocity(ref["noisy_images"], ref["quantized_code"], ref["t"]))


def test_official_keys_are_ours_plus_the_documented_unused_ones(official_fixture):
    tok = from_official(official_fixture["official_state_dict"], official_fixture["config"])
    ours = {ours_to_official(k) for k in tok.state_dict()}
    dropped = set(dropped_official_shapes(tok.config))
    assert ours | dropped == set(official_fixture["official_state_dict"])
    assert not ours & dropped
    assert set(official_shapes(tok.config)) == set(official_fixture["official_state_dict"])


def test_released_file_layout_and_wrapper_prefixes(official_fixture, tmp_path):
    state = official_fixture["official_state_dict"]
    raw = {k: torch.zeros_like(v) for k, v in state.items()}
    released = {
        "total_steps": 1_300_000,
        "model_ema_state_dict": {f"module._orig_mod.{k}": v for k, v in state.items()},
        "model_state_dict": raw,
    }
    path = tmp_path / "flowmo_tiny.pth"
    torch.save(released, path)
    ema = from_official(path, official_fixture["config"])
    close(ema.encode(official_fixture["images"]), official_fixture["encoder_code"])
    raw_model = from_official(path, official_fixture["config"], weights="raw")
    assert all(float(p.detach().abs().sum()) == 0 for p in raw_model.parameters())


def test_unknown_missing_and_misshaped_keys_are_listed(official_fixture):
    state = dict(official_fixture["official_state_dict"])
    state["decoder.extra.weight"] = torch.zeros(1)
    del state["decoder.img_in.bias"]
    state["encoder.txt_in.bias"] = torch.zeros(3)
    with pytest.raises(ValueError) as error:
        from_official(state, official_fixture["config"])
    message = str(error.value)
    assert "decoder.extra.weight" in message and "decoder.img_in.bias" in message
    assert "encoder.txt_in.bias" in message


def test_a_hi_style_configuration_loads_and_runs_the_same_api():
    """Another shape family (56-bit codes in 14-bit groups, patch 2, other widths/heads) through the official
    loader and every fixture entry point: nothing in the code may only work for fixture A's shapes."""
    config = {
        "image_size": 16,
        "patch_size": 2,
        "code_length": 8,
        "code_dim": 56,
        "entropy_group_bits": 14,
        "encoder": {"width": 96, "depth": 1, "heads": 3, "rope_axes": [4, 14, 14]},
        "decoder": {"width": 80, "depth": 2, "heads": 2, "rope_axes": [8, 16, 16]},
        "mlp_ratio": 2.0,
        "qkv_bias": False,
        "rope_theta": 500,
        "attention_scale": "8/head_dim",
        "entropy_temperature": 0.1,
        "entropy_loss_weight": 0.0025,
        "commit_loss_weight": 0.000625,
    }
    torch.manual_seed(0)
    official = {
        name: torch.randn(shape) * 0.05
        for name, shape in official_shapes(FlowMoTokenizer.from_config(config, device="meta").config).items()
    }
    tok = from_official(official, config)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    q = tok.quantize(tok.encode(images))
    assert q.codes.shape == (2, 8, 56) and q.indices.shape == (2, 32) and int(q.indices.max()) < 2**14
    assert torch.equal(tok.quantizer.indices_to_codes(q.indices), q.codes)
    # sub-token 4*l + r holds channels r, r+4, ..., r+52 of token l as bits 0..13
    bits = (q.codes[0, 0].reshape(14, 4) > 0).long()  # [bit j, r]
    expected = (bits * (2 ** torch.arange(14))[:, None]).sum(0)
    assert torch.equal(q.indices[0, :4], expected)
    assert torch.isfinite(q.entropy_loss) and q.per_sample_entropy <= q.codebook_entropy + 1e-6
    v = tok.velocity(images, q.codes, torch.tensor([0.3, 0.9]))
    assert v.shape == images.shape and not torch.allclose(v, tok.velocity(images, None, torch.tensor([0.3, 0.9])))
    _, grid = flow.random_chain_timesteps(2, 8)
    assert tok.sample(q.codes, torch.randn_like(images), timesteps=grid, cfg=1.0, clip=False).shape == images.shape
    assert tok.sample(q.codes, torch.randn_like(images), steps=5).abs().max() <= 1


def test_bf16_autocast_stays_close_to_fp32(reference):
    """Under bf16 autocast RMSNorm and RoPE still run in fp32: the code and the velocity move by ~1e-2."""
    tok, ref = reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        code = tok.encode(ref["images"])
        velocity = tok.velocity(ref["noisy_images"], ref["quantized_code"], ref["t"])
    assert code.dtype == torch.bfloat16
    assert (code.float() - ref["encoder_code"]).abs().max() < 0.05
    assert (velocity.float() - ref["velocity"]).abs().max() < 0.05
