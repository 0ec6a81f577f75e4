"""The decision to skip an optimizer step whose loss or gradients are not finite, made on the device (method §5's
training is long enough that one bad batch must not end it, and fast enough that no step may wait on the host).
FlowMoModule.optimizer_step and the benchmark's step use it the same way; what a run does after K skips in a row is
flowmo.faults.NonFiniteTraining (its exit code)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

from flowmo.faults import NonFiniteTraining, latest_checkpoint


class NonFiniteGuard:
    """The decision to skip an optimizer step whose loss or gradients are not finite, made on the device.

        guard.observe(parts)               # each micro-batch: its loss terms (the total among them)
        flag = guard.found_inf(grads)      # after the last backward: 1.0 = skip; all-reduced (max) over ranks
        ...the fused optimizer reads `flag`...
        guard.poll(step, ...)              # after the step: counters copied to the host without waiting; K in a row
                                           # (seen one step late) stop the run

    Nothing here makes the host wait for the device, so a step never stalls the queue, and every rank
    takes the same decision (a NaN on one rank skips the step everywhere, as DDP averages its gradients anyway).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._bad_loss: Tensor | None = None  # any non-finite micro-batch loss since the last optimizer step
        self._bad_terms: dict[str, Tensor] = {}  # per loss term: non-finite in the latest skipped step
        self._pending_terms: dict[str, Tensor] = {}
        self.skipped: Tensor | None = None  # optimizer steps skipped in this run (since this process started)
        self.in_a_row: Tensor | None = None
        self.longest_run: Tensor | None = None
        self.skipped_so_far = 0  # as last seen on the host
        self._host: Tensor | None = None  # the counters' host copy, and whether that copy has landed
        self._copy_done = None

    def observe(self, parts: dict[str, Tensor]) -> None:
        """A micro-batch's detached loss terms (``total`` included)."""
        for name, value in parts.items():
            bad = ~torch.isfinite(value).all()
            self._pending_terms[name] = bad if name not in self._pending_terms else self._pending_terms[name] | bad
        total = self._pending_terms.get("total")
        if total is not None:
            self._bad_loss = total

    def found_inf(self, grads: list[Tensor]) -> Tensor:
        """0-dim float flag (1.0 = skip this step), the same on every rank; updates the device counters."""
        device = grads[0].device if grads else getattr(self._bad_loss, "device", torch.device("cpu"))
        bad = torch.zeros((), device=device, dtype=torch.bool)
        if grads:
            bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        if self._bad_loss is not None:
            bad = bad | self._bad_loss.to(device)
        flag = bad.float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._count(flag)
        return flag

    def _count(self, flag: Tensor) -> None:
        zero = torch.zeros_like(flag)
        self.skipped = (zero if self.skipped is None else self.skipped) + flag
        self.in_a_row = ((zero if self.in_a_row is None else self.in_a_row) + 1) * flag
        self.longest_run = torch.maximum(zero if self.longest_run is None else self.longest_run, self.in_a_row)
        skip = flag.bool()
        for name, bad in self._pending_terms.items():
            previous = self._bad_terms.get(name, torch.zeros_like(skip))
            self._bad_terms[name] = torch.where(skip, bad.to(skip.device), previous)
        self._pending_terms, self._bad_loss = {}, None

    def poll(self, step: int, run_dir: Path | None) -> int:
        """After each optimizer step: act on the counters copied to the host one step ago (without a device sync:
        a copy is read only once the device says it is done), then queue the next copy. Says how many steps were
        skipped, and stops the run after `limit` in a row (seen one step late). Returns the steps skipped so far."""
        if self._copy_done is not None and self._copy_done():
            skipped, longest = (int(v) for v in self._host.tolist())  # host memory: no device sync
            self._act(skipped, longest, step, run_dir)
        if self.skipped is not None:
            if self._host is None:
                self._host = torch.zeros(2, pin_memory=self.skipped.is_cuda)
            self._host.copy_(torch.stack([self.skipped, self.longest_run]), non_blocking=True)
            self._copy_done = _completion(self.skipped.device)
        return self.skipped_so_far

    def _act(self, skipped: int, longest: int, step: int, run_dir: Path | None) -> None:
        if skipped > self.skipped_so_far:
            terms = ", ".join(name for name, bad in self._bad_terms.items() if bool(bad)) or "gradients only"
            print(
                f"flowmo: {skipped - self.skipped_so_far} optimizer step(s) skipped by step {step}: non-finite "
                f"{terms} ({skipped} in all; {self.limit} in a row stop the run)",
                file=sys.stderr,
            )
            self.skipped_so_far = skipped
        if longest >= self.limit:
            terms = " / ".join(name for name, bad in self._bad_terms.items() if bool(bad)) or "gradients"
            last = latest_checkpoint(run_dir, report=lambda _: None) if run_dir else None
            raise NonFiniteTraining(
                f"{longest} optimizer steps in a row (seen at step {step}) had a non-finite {terms}; no weight, EMA "
                f"or Adam state moved in those steps and nothing non-finite was saved. The last good checkpoint is "
                f"{last or 'none (no save yet)'}: lower --model.optim.lr or check the data, then resume with "
                "--ckpt_path last."
            )


def _completion(device: torch.device):
    """A function telling, without waiting, whether the device has finished what was queued so far."""
    if device.type != "cuda":
        return lambda: True  # CPU work is done when the call returns
    event = torch.cuda.Event()
    event.record()
    return event.query
