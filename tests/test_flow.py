"""Samplers and schedules are pure functions: checked on an analytic velocity field."""

import pytest
import torch

from flowmo import flow
from flowmo.nn.tokenizer import FlowMoTokenizer


def exact_velocity(target):
    """The true rectified-flow velocity towards `target`: z_t = (1-t) x + t eps => v = (z - x) / t."""
    return lambda z, t: (z - target) / t.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("steps, rho", [(25, 4.0), (10, 1.0), (3, 2.0)])
def test_euler_with_exact_velocity_returns_the_target(steps, rho):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    out = flow.sample_euler(exact_velocity(x), torch.randn_like(x), flow.rho_timesteps(steps, rho), clip=False)
    assert torch.allclose(out, x, atol=1e-5)


def test_euler_on_per_sample_random_grids():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 4, 4)
    _, grid = flow.random_chain_timesteps(3, 8)
    assert grid.shape == (3, 9)
    assert torch.all(grid[:, 0] == 1) and torch.all(grid[:, -1] == 0)
    assert torch.all(grid[:, 1:] < grid[:, :-1])
    assert not torch.equal(grid[0], grid[1])
    out = flow.sample_euler(exact_velocity(x), torch.randn_like(x), grid, clip=False)
    assert torch.allclose(out, x, atol=1e-5)


def test_rho_grid_values():
    grid = flow.rho_timesteps(25, 4.0)
    assert grid.shape == (26,)
    assert grid[:5].tolist() == pytest.approx([1, 0.849346, 0.716393, 0.599695, 0.497871], abs=1e-5)
    assert grid[-1] == 0 and grid[-4] == pytest.approx((3 / 25) ** 4)


def test_cfg_interval_guides_six_steps_for_31_evaluations():
    calls = {"cond": 0, "uncond": 0}

    def counted(kind):
        def velocity(z, t):
            calls[kind] += 1
            return torch.zeros_like(z) + (1.0 if kind == "cond" else 0.0)

        return velocity

    interval = (flow.sigma_to_t(0.17), flow.sigma_to_t(1.02))
    assert interval == pytest.approx((0.1453, 0.5050), abs=1e-4)
    guided = flow.guided_velocity(counted("cond"), counted("uncond"), 1.5, interval)
    flow.sample_euler(guided, torch.zeros(1, 1), flow.rho_timesteps(25, 4.0))
    assert calls == {"cond": 25, "uncond": 6}


def test_guidance_formula_and_per_sample_interval():
    cond = lambda z, t: torch.ones_like(z)  # noqa: E731
    uncond = lambda z, t: torch.zeros_like(z)  # noqa: E731
    guided = flow.guided_velocity(cond, uncond, 1.5, (0.2, 0.6))
    out = guided(torch.zeros(3, 2), torch.tensor([0.1, 0.4, 0.9]))
    assert out[:, 0].tolist() == [1.0, 1.5, 1.0]
    assert flow.guided_velocity(cond, uncond, 1.0, None) is cond


def test_time_schedules():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    uniform = flow.sample_time(n, "uniform", generator=g)
    logit_normal = flow.sample_time(n, "lognormal", generator=g)
    fat = flow.sample_time(n, "fat_lognormal", generator=g)
    assert uniform.mean() == pytest.approx(0.5, abs=0.01)
    assert logit_normal.mean() == pytest.approx(0.5, abs=0.01)
    tail = lambda t: (t > 0.98).float().mean().item()  # noqa: E731
    # the thick tail puts ~10% x 2% = 0.2% of the mass above 0.98, where logit-normal has ~0.01%
    assert tail(fat) == pytest.approx(0.1 * 0.02 + 0.9 * tail(logit_normal), abs=5e-4)
    assert tail(fat) > 5 * tail(logit_normal)
    # noise_weighted: density 2t, so P(t < s) = s^2 (most samples where the code must carry the image)
    noise_weighted = flow.sample_time(n, "noise_weighted", generator=g)
    assert noise_weighted.mean() == pytest.approx(2 / 3, abs=0.01)
    assert (noise_weighted < 0.5).float().mean().item() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="unknown time schedule"):
        flow.sample_time(2, "cosine")


def test_interpolation_target_and_x0_estimate_are_consistent():
    x, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.25, 0.9])
    x_t = flow.interpolate(x, noise, t)
    assert torch.allclose(flow.x0_estimate(x_t, flow.velocity_target(x, noise), t), x, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A real tokenizer (the tiny preset, random weights): the public sampler, not a stand-in for it."""
    torch.manual_seed(0)
    return FlowMoTokenizer.from_preset("tiny").eval()


@pytest.mark.parametrize(
    "settings",
    [
        flow.SAMPLERS["paper"],
        flow.SAMPLERS["fast"],
        flow.SamplerSettings(steps=10, cfg=1.0),
        flow.SamplerSettings(steps=6, cfg_interval=None),
        flow.SamplerSettings(steps=12, rho=1.0),
        flow.SamplerSettings(steps=3, cfg=2.0, cfg_interval=(0.0, 0.5)),
    ],
)
def test_sampler_nfe_is_the_count_of_a_real_sampler_run(tiny_tokenizer, settings):
    """SamplerSettings.nfe (what reports and the bench quote) equals the decoder calls the tokenizer's sampler makes
    (a paired CFG call on twice the batch counts 2): counted on a real tokenizer's decoder, decoding one image."""
    batches = []
    hook = tiny_tokenizer.decoder.register_forward_hook(lambda module, args, output: batches.append(len(args[0])))
    try:
        ids = torch.zeros(1, tiny_tokenizer.ids_per_image, dtype=torch.long)
        patch = tiny_tokenizer.config.patch_size
        tiny_tokenizer.detokenize(ids, image_size=(patch, patch), sampler=settings)
    finally:
        hook.remove()
    assert sum(batches) == settings.nfe
    assert flow.SAMPLERS["paper"].nfe == 31 and flow.SAMPLERS["fast"].nfe == 10


def test_sampler_settings_refuse_bad_steps_and_read_yaml_lists():
    with pytest.raises(ValueError, match="positive integer"):
        flow.SamplerSettings(steps=0)
    assert flow.SamplerSettings(cfg_interval=[0.17, 1.02]) == flow.SAMPLERS["paper"]
    with pytest.raises(ValueError, match="unknown sampler 'quick'; choose one of paper, fast"):
        flow.sampler_settings("quick")
