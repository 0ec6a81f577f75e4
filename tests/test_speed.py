"""Every speed change of issue 13 computes what the code before it computed.

The model as a whole is held to the authors' outputs by tests/test_official_fixture.py (encoder, quantizer,
velocities and both samplers, the CFG one included, through the changed RoPE, RMSNorm, modulation and paired
CFG code). Here each change is compared with the formulation it replaced, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flowmo import flow
from flowmo.nn.layers import RMSNorm, gated_add, modulate
from flowmo.nn.rope import pairwise_tables, rope_angles, rotate, token_positions
from flowmo.nn.tokenizer import FlowMoTokenizer
from module_fields import module_with


def rope_per_pair(x, cos, sin):
    """The rotation as it was written before: unbind the (even, odd) pairs, rotate, stack them back."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def with_grad(fn, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward(upstream)
    return out.detach(), x.grad


def test_rope_rotation_is_bit_identical_to_the_per_pair_rotation_forward_and_backward():
    torch.manual_seed(0)
    cos, sin = rope_angles(token_positions(16, 8, 8), (4, 14, 14), 10000.0)
    x, upstream = torch.randn(2, 3, 80, 32), torch.randn(2, 3, 80, 32)
    new = with_grad(lambda v: rotate(v, *pairwise_tables(cos, sin)), x, upstream)
    old = with_grad(lambda v: rope_per_pair(v, cos, sin), x, upstream)
    assert torch.equal(new[0], old[0])
    assert torch.allclose(new[1], old[1], atol=1e-6)


def test_rms_norm_kernel_matches_the_written_out_formula():
    torch.manual_seed(0)
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.scale.uniform_(0.5, 1.5)
    x, upstream = torch.randn(2, 3, 80, 32) * 3, torch.randn(2, 3, 80, 32)

    def written_out(v):
        return v * torch.rsqrt(v.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * norm.scale

    new, old = with_grad(norm, x, upstream), with_grad(written_out, x, upstream)
    assert torch.allclose(new[0], old[0], atol=1e-6) and torch.allclose(new[1], old[1], atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.float32  # q and k stay fp32 through RoPE (method §8.21)


def test_fused_modulation_and_gate_match_the_unfused_ones():
    torch.manual_seed(0)
    h, shift, scale, gate, update = (
        torch.randn(2, 10, 64),
        torch.randn(2, 1, 64),
        torch.randn(2, 1, 64),
        torch.randn(2, 1, 64),
        torch.randn(2, 10, 64),
    )
    normed = F.layer_norm(h, (64,), eps=1e-6)
    assert torch.allclose(modulate(h, shift, scale), (1 + scale) * normed + shift, atol=1e-6)
    assert torch.allclose(gated_add(h, gate, update), h + gate * update, atol=1e-6)
    assert torch.equal(gated_add(h, None, update), h + update)


def test_cfg_in_one_call_of_twice_the_batch_equals_two_calls():
    torch.manual_seed(0)
    tok = FlowMoTokenizer.from_preset("tiny").eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    codes = tok.quantize(tok.encode(images), with_losses=False).codes
    noise = torch.randn_like(images)
    grid = flow.rho_timesteps(25, 4.0)
    interval = tuple(flow.sigma_to_t(s) for s in (0.17, 1.02))
    cond = lambda z, t: tok.velocity(z, codes, t)  # noqa: E731
    uncond = lambda z, t: tok.velocity(z, None, t)  # noqa: E731
    with torch.no_grad():
        two_calls = flow.sample_euler(flow.guided_velocity(cond, uncond, 1.5, interval), noise, grid)
        one_call = tok.sample(codes, noise, steps=25, rho=4.0, cfg=1.5, cfg_interval=(0.17, 1.02))
        v_c, v_u = tok.velocity_with_null(noise, codes, 0.5)
        assert torch.allclose(v_c, tok.velocity(noise, codes, 0.5), atol=1e-5)
        assert torch.allclose(v_u, tok.velocity(noise, None, 0.5), atol=1e-5)
    assert torch.allclose(one_call, two_calls, atol=1e-5)


def test_the_training_module_uses_fused_adam_on_cpu():
    module = module_with(preset="tiny", perceptual="none")
    optimizer = module.configure_optimizers()
    assert optimizer.defaults["fused"] is True


def test_the_fast_sampler_is_the_paper_grid_with_8_steps_and_10_network_evaluations():
    import pytest

    from flowmo.flow import SAMPLERS

    tok = FlowMoTokenizer.from_preset("tiny").eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = tok.tokenize(images)
    batches = []  # decoder calls of the fast sampler, counted on the real decoder (a paired CFG call counts 2)
    hook = tok.decoder.register_forward_hook(lambda module, args, output: batches.append(len(args[0])))
    fast = tok.detokenize(ids, generator=torch.Generator().manual_seed(0), sampler="fast")
    hook.remove()
    eight = tok.detokenize(ids, generator=torch.Generator().manual_seed(0), steps=8)
    assert torch.equal(fast, eight) and SAMPLERS["fast"] == SAMPLERS["paper"].replace(steps=8)
    assert sum(batches) == 10 * len(ids) and SAMPLERS["fast"].nfe == 10
    with pytest.raises(ValueError, match="unknown sampler"):
        tok.detokenize(ids, sampler="quick")
