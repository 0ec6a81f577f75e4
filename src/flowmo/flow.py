"""Rectified flow in pixel space (spec sections 3-4): time sampling, interpolation, Euler samplers.

Convention (spec 8.7): x_t = (1 - t) x + t eps, t in [0, 1] (t = 1 is pure noise); the network predicts
the velocity v = eps - x; the one-step clean estimate is x_t - t v; samplers walk t from 1 down to 0
with z <- z - (t_k - t_{k+1}) v(z, t_k).

Everything here is a pure function of tensors: no module, no Lightning.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowmo.errors import UserError

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (z [B, ...], t [B]) -> velocity [B, ...]
TIME_SCHEDULES = ("fat_lognormal", "lognormal", "uniform", "noise_weighted")


# ---------------------------------------------------------------------------------------------- training
def sample_time(batch: int, schedule: str = "fat_lognormal", *, device=None, generator=None,
                uniform_fraction: float = 0.1) -> Tensor:
    """Per-sample training times t [batch] (spec 4).

    fat_lognormal: with probability 0.9 sigmoid(N(0,1)), else U(0,1) ("thick-tailed logit-normal"):
    plain logit-normal leaves almost no mass near t=1 and the decoder then shifts colours.
    noise_weighted: t = sqrt(U(0,1)), density 2t: most samples where the image is mostly noise and the decoder
    must read the code (not the paper's; the CPU demo's tiny model learns its code faster with it).
    """
    if schedule not in TIME_SCHEDULES:
        raise UserError(f"unknown time schedule {schedule!r}; choose one of {TIME_SCHEDULES}.")
    uniform = torch.rand(batch, device=device, generator=generator)
    if schedule == "uniform":
        return uniform
    if schedule == "noise_weighted":
        return uniform.sqrt()
    logit_normal = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    if schedule == "lognormal":
        return logit_normal
    use_uniform = torch.rand(batch, device=device, generator=generator) < uniform_fraction
    return torch.where(use_uniform, uniform, logit_normal)


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast t [B] against an image batch [B, ...] (on its device: grids may live on the host)."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(device=like.device, dtype=like.dtype)


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t noise."""
    t = _per_sample(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """d x_t / d t = noise - x: what the decoder learns to predict."""
    return noise - x


def x0_estimate(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """One-step clean-image estimate x_t - t v (not clipped; gradients reach encoder and decoder)."""
    return x_t - _per_sample(t, x_t) * velocity


# ---------------------------------------------------------------------------------------------- grids
def rho_timesteps(steps: int, rho: float = 4.0, device=None) -> Tensor:
    """Descending grid t_k = (k/n)^rho for k = n..0, [n + 1] (spec 4, 8.13). rho=1 is uniform."""
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}.")
    k = torch.arange(steps, -1, -1, dtype=torch.float64, device=device)
    return ((k / steps) ** rho).float()


def sigma_to_t(sigma: float) -> float:
    """EDM noise level -> rectified-flow time: t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)


def random_chain_timesteps(batch: int, steps: int = 8, *, device=None, generator=None,
                           u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stage-1B random grid (spec 4): u ~ U(0,1) [B, K+1]; s = cumsum(u) - cumsum(u)[0], divided by its
    last entry (0 = s_0 < ... < s_K = 1); t = s reversed, from 1 down to 0. Returns (u, t), both [B, K+1]."""
    if u is None:
        u = torch.rand(batch, steps + 1, device=device, generator=generator)
    cumulative = u.double().cumsum(dim=1)
    s = cumulative - cumulative[:, :1]
    s = s / s[:, -1:]
    return u, s.flip(dims=[1]).to(u.dtype)


# ---------------------------------------------------------------------------------------------- sampling
def sample_euler(velocity_fn: VelocityFn, noise: Tensor, timesteps: Tensor, *, clip: bool = True) -> Tensor:
    """Euler integration from t = timesteps[..., 0] (1) to timesteps[..., -1] (0).

    timesteps: [K+1] shared by the batch, or [B, K+1] one grid per sample (Stage-1B chains). A grid on the
    host keeps per-step decisions (e.g. the CFG interval) free of device synchronisation.
    """
    z = noise
    for k in range(timesteps.shape[-1] - 1):
        t_now = _grid_column(timesteps, k, z.shape[0])
        step = t_now - _grid_column(timesteps, k + 1, z.shape[0])
        z = z - _per_sample(step, z) * velocity_fn(z, t_now)
    return z.clamp(-1, 1) if clip else z


def _grid_column(timesteps: Tensor, k: int, batch: int) -> Tensor:
    column = timesteps[..., k]
    return column.expand(batch) if column.dim() == 0 else column


def guided_velocity(conditional: VelocityFn, unconditional: VelocityFn, cfg: float,
                    interval_t: tuple[float, float] | None = None,
                    paired: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None) -> VelocityFn:
    """Classifier-free guidance v_u + cfg (v_c - v_u), applied only where t lies in `interval_t`
    (inclusive; None = everywhere). Outside the interval only the conditional model runs.

    `paired(z, t) -> (v_c, v_u)`, when given, computes both velocities of a guided step in one network call
    (twice the batch, one pass over the weights) instead of two calls."""
    if cfg == 1.0:
        return conditional

    def both(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return paired(z, t) if paired is not None else (conditional(z, t), unconditional(z, t))

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        if interval_t is None:
            v_cond, v_uncond = both(z, t)
            return v_cond + (cfg - 1.0) * (v_cond - v_uncond)
        inside = (t >= interval_t[0]) & (t <= interval_t[1])
        if not bool(inside.any()):  # skip the unconditional pass on unguided steps: 31 NFE, not 50
            return conditional(z, t)
        v_cond, v_uncond = both(z, t)
        v_guided = v_cond + (cfg - 1.0) * (v_cond - v_uncond)
        return torch.where(_per_sample(inside, z).bool(), v_guided, v_cond)

    return velocity
