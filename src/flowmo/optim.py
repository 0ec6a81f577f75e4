"""The training update that follows every backward pass (method §5), shared by FlowMoModule and the benchmark:

    update = TrainingUpdate(tokenizer, ModelEMA.for_settings(tokenizer, settings), WeightNormProjection(tokenizer))
    optimizer = update.adam(groups, settings, device)    # settings: flowmo.settings.OptimSettings
    update.step(optimizer, step_fn, found_inf)   # Adam (skipped on the device if found_inf), projection, EMA

Adam uses its fused kernel, which skips the update (moments and step counts included) when `found_inf` is 1: the
non-finite guard (flowmo.nonfinite.NonFiniteGuard) decides that on the device, so no step waits on the host. The
weight-norm projection and the EMA follow the same flag. EMA and projection norms are nn.Modules owned by
FlowMoModule, so their tensors are in every checkpoint and a resumed run continues exactly (the authors' code
restarts the EMA from the raw weights on resume; we do not).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from flowmo.settings import InitSettings, OptimSettings, group_hparams

FUSED_ADAM_DEVICES = ("cuda", "cpu", "xpu", "mps")
WARMUP = 20  # ModelEMA's warm-up: update n's decay is at most (1 + n) / (WARMUP + n)


class ModelEMA(nn.Module):
    """EMA of a model's full state dict, updated every `every` optimizer steps with decay**every.

    decay 0.9999 every 10 steps gives 0.9999**10 ~ 0.9990 per update (method §5): the same horizon as a
    per-step EMA at a tenth of the cost.

    `warmup` caps the decay of update n (counted from 0) at (1 + n) / (WARMUP + n), TensorFlow's
    ExponentialMovingAverage(num_updates) rule with 20 for its 10: the first updates average mostly recent weights
    instead of keeping ~all of the random initialisation (after 20 updates of 0.999 the EMA is still 98% initial
    weights, pure noise). Such an EMA lags the raw weights by ~1/WARMUP of the run; 20 halves TensorFlow's lag, which
    cost 0.6 dB against the raw weights after 150 steps of the README's CPU recipe (docs/training.md). The cap binds
    only while it is below decay**every (the first ~19,000 updates for the paper's 0.999); after that the recursion
    is the paper's and the warm-up's share of the average shrinks by decay**every per update. The update count comes
    from the optimizer step (`updates_at`), so it needs no state of its own.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, every: int = 10, warmup: bool = False):
        super().__init__()
        if not 0 < decay < 1 or every < 1:
            raise ValueError(f"EMA needs 0 < decay < 1 and every >= 1, got decay={decay}, every={every}.")
        self.decay, self.every, self.warmup = decay, every, warmup
        self.module = copy.deepcopy(model).requires_grad_(False)

    @classmethod
    def for_settings(cls, model: nn.Module, optim: OptimSettings, init: InitSettings | None = None) -> "ModelEMA":
        """The EMA of `optim`'s decay and cadence; the warm-up is for an average that starts from a random
        initialisation, so one that starts from trained weights (Stage 1B from 1A) averages them in at the full decay
        from its first update, as the authors' 1B does."""
        warmup = optim.ema_warmup and not (init is not None and init.whole_model)
        return cls(model, optim.ema_decay, optim.ema_every, warmup)

    def updates_at(self, step: int) -> int:
        """EMA updates made by the end of optimizer step `step` (counted from 1)."""
        return step // self.every

    def update_decay(self, done: int) -> float:
        """The decay of the update that follows `done` earlier ones: decay**every, capped during the warm-up."""
        steady = self.decay**self.every
        return min(steady, (1 + done) / (WARMUP + done)) if self.warmup else steady

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        ema_state, state = self.module.state_dict(), model.state_dict()
        names = [k for k, v in ema_state.items() if v.is_floating_point()]
        return [ema_state[k] for k in names], [state[k].detach() for k in names]

    def is_due(self, step: int) -> bool:
        """Whether optimizer step `step` (counted from 1) moves the EMA: steps every, 2 * every, ..."""
        return step % self.every == 0

    def initial_share(self, updates: int) -> float:
        """The weight the starting weights still hold in the average after `updates` updates: 0.98 after 20 of the
        paper's 0.999 without warm-up (the EMA is then mostly its random start), 1e-10 with it."""
        share = 1.0
        for done in range(updates):
            share *= self.update_decay(done)
            if share < 1e-12:  # negligible; stops the loop long before a 1.3M-step run's 130k updates
                return 0.0
        return share

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None, done: int = 0) -> None:
        """ema <- d ema + (1 - d) w for every floating-point tensor, d = update_decay(done) (`done`: updates made
        before this one); `skip` (a device flag, 1 = skip) leaves it exactly unchanged without a host sync."""
        ema, current = self._pairs(model)
        weight = 1.0 - self.update_decay(done)
        if skip is None:
            torch._foreach_lerp_(ema, current, weight)
            return
        weight = (1 - skip.float()) * weight  # 0 on a skipped step: ema + 0 * (w - ema) is ema
        torch._foreach_lerp_(ema, current, [weight] * len(ema))

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        ema, current = self._pairs(model)
        torch._foreach_copy_(ema, current)

    @torch.no_grad()
    def relative_distance(self, model: nn.Module) -> Tensor:
        """||ema - w|| / ||w|| over all floating-point tensors (a logged health signal). Tensor by tensor, so no
        model-sized temporary is allocated (3.2 GiB for FlowMo-Lo)."""
        ema, current = self._pairs(model)
        squared = torch.stack([torch.linalg.vector_norm(e.float() - w.float()) ** 2 for e, w in zip(ema, current)])
        norms = torch.stack(torch._foreach_norm(current)).float()
        return squared.sum().sqrt() / torch.linalg.vector_norm(norms).clamp_min(1e-12)


def weights_record(weights: str, hparams: Mapping | None = None, step: int | None = None) -> dict:
    """Which weights a result came from, for metrics.json, exports and the console: "ema" or "raw", the optimizer
    step, and for EMA weights how many updates they averaged (None where the file does not say, e.g. a release)."""
    record: dict = {"weights": weights, "step": step}
    saved = group_hparams(hparams or {}, "optim")
    if weights != "ema" or step is None or "ema_every" not in saved:
        return record if weights != "ema" else {**record, "ema_updates": None}
    optim = OptimSettings(
        ema_decay=saved["ema_decay"], ema_every=saved["ema_every"], ema_warmup=saved.get("ema_warmup", False)
    )
    ema = ModelEMA.for_settings(nn.Identity(), optim, InitSettings(**group_hparams(hparams, "init")))
    updates = ema.updates_at(step)
    return {
        **record,
        "ema_updates": updates,
        "ema_decay": ema.decay,
        "ema_every": ema.every,
        "ema_warmup": ema.warmup,
        "ema_initial_share": round(ema.initial_share(updates), 6),
    }


def describe_weights(record: dict) -> str:
    """One line for the console: 'EMA weights of step 150 (15 updates of decay 0.9999 every 10 steps, warm-up)'."""
    step = f" of step {record['step']}" if record.get("step") is not None else ""
    if record["weights"] != "ema":
        return f"raw weights{step}"
    if record.get("ema_updates") is None:
        return f"EMA weights{step}"
    warmup = ", warm-up" if record["ema_warmup"] else ""
    return (
        f"EMA weights{step} ({record['ema_updates']} updates of decay {record['ema_decay']:g} every "
        f"{record['ema_every']} steps{warmup}; {record['ema_initial_share']:.0%} of the average is the "
        "starting weights)" + (STILL_STARTING if record["ema_initial_share"] >= 0.5 else "")
    )


STILL_STARTING = (
    ". WARNING: the EMA has not yet averaged over its horizon and is mostly its starting weights; "
    "evaluate the raw weights (--model.eval.use_ema false, weights='raw') or train longer"
)


def block_linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear inside a double block (qkv, proj, both MLP layers, modulation), method §5."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".double_blocks." in f".{name}"
    ]


class WeightNormProjection(nn.Module):
    """After each optimizer step, rescale each block Linear weight back to its initial Frobenius norm
    (EDM2-style "fix_initial_norms", per matrix, method §8.15). The target norms are a checkpointed buffer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = block_linear_names(model)
        with torch.no_grad():
            norms = [model.get_submodule(n).weight.detach().float().norm() for n in self.names]
        self.register_buffer("target_norms", torch.stack(norms) if norms else torch.zeros(0))
        self._weights: list[nn.Parameter] | None = None  # resolved on first use, not on every step
        self._chosen: tuple[tuple[int, ...], Tensor] | None = None  # the trainable weights' indices, on the device

    def _trainable(self, model: nn.Module) -> tuple[list[nn.Parameter], Tensor]:
        """The trainable weights and their targets. Indexing a device tensor with a Python list would copy the list
        from pageable host memory each step, which waits for the device; so the index is built on the device from a
        range, once per set of trainable weights (it changes only at the encoder freeze)."""
        if self._weights is None:
            self._weights = [model.get_submodule(name).weight for name in self.names]
        chosen = tuple(i for i, w in enumerate(self._weights) if w.requires_grad)
        device = self.target_norms.device
        if self._chosen is None or self._chosen[0] != chosen or self._chosen[1].device != device:
            positions = torch.arange(len(self.names), device=device)
            self._chosen = (chosen, torch.stack([positions[i] for i in chosen]) if chosen else positions[:0])
        return [self._weights[i] for i in chosen], self.target_norms.index_select(0, self._chosen[1])

    @torch.no_grad()
    def apply_to(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """Project the trainable weights (frozen ones have not moved, so they are skipped); `skip` (a device
        flag) keeps them exactly as they are."""
        weights, targets = self._trainable(model)
        if not weights:
            return
        norms = torch.stack(torch._foreach_norm(weights))  # master weights are fp32 (method §8.21)
        scales = targets / norms.clamp_min(1e-12)
        if skip is not None:
            scales = torch.where(skip.bool(), torch.ones_like(scales), scales)
        torch._foreach_mul_(weights, list(scales.unbind()))


def adam_kernel(device: torch.device) -> dict[str, bool]:
    """Adam's one-kernel implementation wherever torch has it: it takes the device-side skip flag (found_inf),
    and on CPU torch otherwise picks its per-tensor loop (536 ms per step for cpu-mid's 26M parameters against
    17 ms fused, measured on this project's 2-core CPU)."""
    if device.type in FUSED_ADAM_DEVICES:
        return {"fused": True}
    return {"foreach": True}


class TrainingUpdate:
    """Adam, the weight-norm projection and the EMA, in that order, after each backward pass.

    `step` is called once per optimizer step with the function that runs Adam's step (FlowMoModule passes
    Lightning's, which also runs the precision plugin; the benchmark passes optimizer.step) and the device flag
    of the non-finite guard.
    """

    def __init__(self, model: nn.Module, ema: ModelEMA, projection: WeightNormProjection | None):
        self.model, self.ema, self.projection = model, ema, projection
        self.steps = 0  # optimizer steps taken through this object (the module passes Lightning's own count)

    @staticmethod
    def adam(groups: list[dict], settings: OptimSettings, device: torch.device) -> torch.optim.Adam:
        """Adam(0.9, 0.95) without weight decay (method §5), fused where torch has the kernel."""
        return torch.optim.Adam(
            groups, lr=settings.lr, betas=settings.betas, eps=settings.adam_eps, weight_decay=0.0, **adam_kernel(device)
        )

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        run_step: Callable[[], object],
        found_inf: Tensor | None = None,
        step: int | None = None,
    ) -> None:
        """Adam (`run_step`), skipped on the device where `found_inf` is 1; then the projection and the EMA, which
        hold still on the same flag. `step` (counted from 1) decides the EMA's cadence."""
        self.steps = self.steps + 1 if step is None else step
        with skip_flag(optimizer, found_inf) as fused:
            if found_inf is None or fused or not bool(found_inf):  # unfused Adam (no kernel here): the host decides
                run_step()
        if self.projection is not None:
            self.projection.apply_to(self.model, found_inf)
        if self.ema.is_due(self.steps):
            self.ema.update(self.model, found_inf, done=self.ema.updates_at(self.steps) - 1)


@contextlib.contextmanager
def skip_flag(optimizer: torch.optim.Optimizer, found_inf: Tensor | None):
    """Hand `found_inf` to torch's fused Adam the way torch's own GradScaler does, as the attribute its step reads:
    where it is 1 the kernel leaves weights, moments and step counts as they were, with no host read. Yields whether
    the optimizer is fused (without the kernel, the caller decides on the host)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper: the flag goes on torch's own
    fused = bool(optimizer.defaults.get("fused"))
    if found_inf is None or not fused:
        yield fused
        return
    optimizer.found_inf = found_inf.float()
    try:
        yield fused
    finally:
        del optimizer.found_inf


def drop_param_group(checkpoint: dict, name: str, clear: bool = False) -> None:
    """The checkpoint's optimizer without its param group `name` (parameters renumbered) and its lr schedulers
    without that group's entries; `clear` also drops every optimizer state (Adam restarts)."""
    for index, state in enumerate(checkpoint.get("optimizer_states", [])):
        positions = [i for i, group in enumerate(state["param_groups"]) if group.get("name") == name]
        groups = [group for group in state["param_groups"] if group.get("name") != name]
        renumber = {old: new for new, old in enumerate(i for group in groups for i in group["params"])}
        kept = {} if clear else {renumber[i]: value for i, value in state["state"].items() if i in renumber}
        checkpoint["optimizer_states"][index] = {
            "state": kept,
            "param_groups": [{**group, "params": [renumber[i] for i in group["params"]]} for group in groups],
        }
        for scheduler in checkpoint.get("lr_schedulers", []):  # per-group lists, e.g. LambdaLR's base_lrs
            for key, value in scheduler.items():
                if isinstance(value, list) and len(value) == len(state["param_groups"]):
                    scheduler[key] = [v for i, v in enumerate(value) if i not in positions]
