"""Rectified flow in pixel space (method §3-4): time sampling, interpolation, Euler samplers.

Convention (method §8.7): x_t = (1 - t) x + t eps, t in [0, 1] (t = 1 is pure noise); the network predicts
the velocity v = eps - x; the one-step clean estimate is x_t - t v; samplers walk t from 1 down to 0
with z <- z - (t_k - t_{k+1}) v(z, t_k).

Everything here is a pure function of tensors: no module, no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from flowmo.errors import UserError

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (z [B, ...], t [B]) -> velocity [B, ...]
TIME_SCHEDULES = ("fat_lognormal", "lognormal", "uniform", "noise_weighted")


# ---------------------------------------------------------------------------------------------- training
def sample_time(
    batch: int, schedule: str = "fat_lognormal", *, device=None, generator=None, uniform_fraction: float = 0.1
) -> Tensor:
    """Per-sample training times t [batch] (method §4).

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
    """Descending grid t_k = (k/n)^rho for k = n..0, [n + 1] (method §4, §8.13). rho=1 is uniform."""
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}.")
    k = torch.arange(steps, -1, -1, dtype=torch.float64, device=device)
    return ((k / steps) ** rho).float()


def sigma_to_t(sigma: float) -> float:
    """EDM noise level -> rectified-flow time: t = sigma / (1 + sigma)."""
    return sigma / (1.0 + sigma)


def random_chain_timesteps(
    batch: int, steps: int = 8, *, device=None, generator=None, u: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Stage-1B random grid (method §4): u ~ U(0,1) [B, K+1]; s = cumsum(u) - cumsum(u)[0], divided by its
    last entry (0 = s_0 < ... < s_K = 1); t = s reversed, from 1 down to 0. Returns (u, t), both [B, K+1]."""
    if u is None:
        u = torch.rand(batch, steps + 1, device=device, generator=generator)
    cumulative = u.double().cumsum(dim=1)
    s = cumulative - cumulative[:, :1]
    s = s / s[:, -1:]
    return u, s.flip(dims=[1]).to(u.dtype)


# ---------------------------------------------------------------------------------------------- sampler settings
@dataclass(frozen=True)
class SamplerSettings:
    """How a tokenizer decodes (method §4): `steps` Euler steps on t_k = (k/steps)^rho, classifier-free guidance of
    scale `cfg` where the EDM noise level lies in `cfg_interval` (None: at every step; cfg 1: none)."""

    steps: int = 25
    rho: float = 4.0
    cfg: float = 1.5
    cfg_interval: tuple[float, float] | None = (0.17, 1.02)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise UserError(f"sampler steps must be a positive integer, got {self.steps!r}.")
        if self.cfg_interval is not None:
            low, high = (float(s) for s in self.cfg_interval)  # a YAML list becomes the tuple
            object.__setattr__(self, "cfg_interval", (low, high))

    def timesteps(self, device=None) -> Tensor:
        """The descending grid [steps + 1] from t = 1 to 0."""
        return rho_timesteps(self.steps, self.rho, device=device)

    @property
    def interval_t(self) -> tuple[float, float] | None:
        """cfg_interval in rectified-flow time (t = sigma / (1 + sigma))."""
        return None if self.cfg_interval is None else tuple(sigma_to_t(s) for s in self.cfg_interval)

    def guided_steps(self) -> list[bool]:
        """Per Euler step, whether it is guided (decided on the host: no device sync while sampling)."""
        if self.cfg == 1.0:
            return [False] * self.steps
        times = self.timesteps()[:-1].tolist()  # the t at which each step evaluates the velocity
        low, high = self.interval_t or (-float("inf"), float("inf"))
        return [low <= t <= high for t in times]

    @property
    def nfe(self) -> int:
        """Decoder evaluations per image: one per step, plus one per guided step (31 for the paper's sampler)."""
        return self.steps + sum(self.guided_steps())

    def replace(self, **changes) -> "SamplerSettings":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        interval = None if self.cfg_interval is None else list(self.cfg_interval)
        return {"steps": self.steps, "rho": self.rho, "cfg": self.cfg, "cfg_interval": interval}


# The paper's sampler (method §4), and 8 of its steps: 10 network evaluations instead of 31. 8 is the chain length
# Stage 1B post-trains the decoder for; on the demo's held-out crops its PSNR and SSIM are at or above the 25-step
# sampler's (docs/performance.md); rFID / LPIPS of fewer steps were not measured (no feature weights here).
SAMPLERS = {"paper": SamplerSettings(), "fast": SamplerSettings(steps=8)}


def sampler_settings(name: str = "paper", **overrides) -> SamplerSettings:
    """A named sampler ("paper", "fast") with single settings overridden (e.g. steps=10)."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    return SAMPLERS[name].replace(**overrides)


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


def guided_velocity(
    conditional: VelocityFn,
    unconditional: VelocityFn,
    cfg: float,
    interval_t: tuple[float, float] | None = None,
    paired: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    guided_steps: list[bool] | None = None,
) -> VelocityFn:
    """Classifier-free guidance v_u + cfg (v_c - v_u), applied only where t lies in `interval_t`
    (inclusive; None = everywhere). Outside the interval only the conditional model runs.

    `paired(z, t) -> (v_c, v_u)`, when given, computes both velocities of a guided step in one network call
    (twice the batch, one pass over the weights) instead of two calls. `guided_steps` (a grid shared by the
    batch: SamplerSettings.guided_steps) says per call, in order, whether that step is guided: decided on the
    host, so a grid on the device needs no synchronisation. Without it (per-sample grids) each sample's t decides.
    """
    if cfg == 1.0:
        return conditional
    flags = iter(guided_steps) if guided_steps is not None else None

    def both(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return paired(z, t) if paired is not None else (conditional(z, t), unconditional(z, t))

    def guided(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(guided velocity, conditional velocity)."""
        v_cond, v_uncond = both(z, t)
        return v_cond + (cfg - 1.0) * (v_cond - v_uncond), v_cond

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        if flags is not None:  # skip the unconditional pass on unguided steps: 31 NFE, not 50
            return guided(z, t)[0] if next(flags) else conditional(z, t)
        if interval_t is None:
            return guided(z, t)[0]
        inside = (t >= interval_t[0]) & (t <= interval_t[1])
        if not bool(inside.any()):
            return conditional(z, t)
        v_guided, v_cond = guided(z, t)
        return torch.where(_per_sample(inside, z).bool(), v_guided, v_cond)

    return velocity
