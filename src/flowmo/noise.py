"""The training noise of one process: a torch.Generator per rank, seeded from (seed, rank) and checkpointed per rank.

Both LightningModules (the tokenizer's t / noise / CFG dropout / chain grids, the generator's masks and class
dropout) draw from one of these. Every rank saves its own state into the checkpoint (gathered to the rank that
writes the file) and takes its own back on resume, so DDP ranks never share a noise stream after a requeue.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor


class RankNoise:
    def __init__(self, seed: int, key: str):
        """key: the checkpoint entry holding the list of per-rank states; `key` without its final "s" holds rank
        0's alone, as checkpoints written before per-rank states have it."""
        self.seed = seed
        self.key = key
        self._generator: torch.Generator | None = None
        self._pending: Tensor | None = None
        self._reseeded_at = 0  # a resume on another world size reseeds every rank from (seed, rank, this step)

    def generator(self, device: torch.device, rank: int) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed * 1_000_003 + rank + 7_919 * self._reseeded_at)
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
        return self._generator

    def save(self, checkpoint: dict[str, Any], device: torch.device, rank: int) -> None:
        """A collective under DDP: Lightning calls on_save_checkpoint on every rank together."""
        states = _gather_from_ranks(self.generator(device, rank).get_state())
        checkpoint[self.key] = states
        checkpoint[self.key[:-1]] = states[0]

    def load(self, checkpoint: dict[str, Any], world_size: int, rank: int) -> None:
        """Each rank takes its own state back; another world size reseeds each rank from (seed, rank, step), said
        once, so ranks never share a stream."""
        states = checkpoint.get(self.key) or [checkpoint.get(self.key[:-1])]
        self._generator = None
        if len(states) == world_size and states[rank] is not None:
            self._pending = states[rank]
            return
        step = int(checkpoint.get("global_step", 0))
        self._pending, self._reseeded_at = None, step
        if rank == 0:
            print(
                f"flowmo: the checkpoint holds the noise state of {len(states)} rank(s), this run has "
                f"{world_size}: every rank's noise is reseeded from (seed, rank, step {step}).",
                file=sys.stderr,
            )


def _gather_from_ranks(state: Tensor) -> list[Tensor]:
    """Every rank's tensor, in rank order."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def evaluation_noise(images: Tensor, seed: int, rank: int, batch_idx: int) -> Tensor:
    """Decoding noise fixed by (seed, rank, batch index), so that repeated evaluations of one model compare."""
    generator = torch.Generator(device=images.device)
    generator.manual_seed(seed * 7919 + rank * 1_000_003 + batch_idx)
    return torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
