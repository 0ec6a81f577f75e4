"""The training step never waits on the host (issues 21, 28): inside `training_step` and `optimizer_step` every call
that would copy a device value to the host (item, bool, int, float, cpu, tolist, numpy) raises, and so does every
tensor made from Python data (torch.tensor, as_tensor, from_numpy, indexing with a list: aten.lift_fresh) or copied
from a CPU tensor to another device: on a GPU both are copies from pageable host memory, which wait for the device.
On this CPU they are cheap but the same code paths, so the test catches them."""

from __future__ import annotations

import contextlib
import warnings

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from flowmo.flow import SamplerSettings
from flowmo.module import FlowMoModule
from module_fields import module_with

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")

HOST_READS = ("item", "__bool__", "__int__", "__float__", "cpu", "tolist", "numpy")


class HostSync(AssertionError):
    pass


class HostDataRefused(TorchDispatchMode):
    """Refuses tensors made from Python data and copies from a CPU tensor to another device."""

    COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.lift_fresh.default:
            raise HostSync("a tensor made from Python data inside the training step: a host-to-device copy")
        if func in self.COPIES and self._host_to_device(func, args, kwargs):
            raise HostSync("a CPU tensor copied to the device inside the training step")
        return func(*args, **kwargs)

    @staticmethod
    def _host_to_device(func, args, kwargs) -> bool:
        if func is torch.ops.aten.copy_.default:
            target, source = args[0], args[1]
            return source.device.type == "cpu" and target.device.type != "cpu"
        device = kwargs.get("device")
        return args[0].device.type == "cpu" and device is not None and torch.device(device).type != "cpu"


HOST_COPY_READ = [False]  # True while the guard reads its counters' host copy (see NoHostSyncModule)


@contextlib.contextmanager
def host_reads_raise(refuse_host_data: bool = True):
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def method(self, *args, **kwargs):
            if HOST_COPY_READ[0]:
                return originals[name](self, *args, **kwargs)
            raise HostSync(f"Tensor.{name} inside the training step: a host synchronisation")

        return method

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        with HostDataRefused() if refuse_host_data else contextlib.nullcontext():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class NoHostSyncModule(FlowMoModule):
    """FlowMoModule whose step hooks run with host reads refused; counts how many steps went through them. The first
    step may make tensors from host data once: Lightning makes each logged key's accumulator from a Python float."""

    steps_checked = 0

    def _refusals(self):
        return host_reads_raise(refuse_host_data=self.global_step > 0)

    def training_step(self, batch, batch_idx):
        with self._refusals():
            return super().training_step(batch, batch_idx)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        poll = self.guard.poll

        def poll_host_copy(*args, **kwargs):
            """The guard reads a host copy of its counters that the device has finished writing (an event query on
            CUDA): a read of host memory, not a synchronisation. On a CPU run every tensor is host memory, so the
            refusal cannot tell the two apart: it lets this one read through."""
            HOST_COPY_READ[0] = True
            try:
                return poll(*args, **kwargs)
            finally:
                HOST_COPY_READ[0] = False

        self.guard.poll = poll_host_copy

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        def closure():
            with self._refusals():
                return optimizer_closure()

        with self._refusals():
            super().optimizer_step(epoch, batch_idx, optimizer, closure)
        type(self).steps_checked += 1


def images(count: int = 8, size: int = 32, nan_at: int | None = None) -> torch.Tensor:
    batch = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if nan_at is not None:
        batch[nan_at, 0, 3, 3] = float("nan")
    return batch


def fit(model: FlowMoModule, data: torch.Tensor, steps: int, accumulation: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        accumulate_grad_batches=accumulation,
    )
    trainer.fit(model, DataLoader(data, batch_size=2))
    return trainer


def test_the_refusal_is_real():
    with host_reads_raise(), pytest.raises(HostSync):
        bool(torch.ones(()))
    assert bool(torch.ones(()))  # restored
    weights = torch.arange(4.0)
    for made_from_host_data in (lambda: torch.tensor([1.0]), lambda: weights[[0, 2]]):
        with host_reads_raise(), pytest.raises(HostSync, match="Python data"):
            made_from_host_data()
    with host_reads_raise():
        doubled = weights[1:3] * 2.0  # a slice and a Python scalar stay on the device: allowed
    assert torch.equal(doubled, torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize(
    "stage_kwargs",
    [
        dict(stage="1a", freeze_encoder_after=2),  # crosses the encoder freeze (optimizer state cleared)
        dict(stage="1a", freeze_encoder_after=None, accumulation=2),
    ],
    ids=["1a-freeze", "1a-accumulate"],
)
def test_stage_1a_steps_make_no_host_read(stage_kwargs):
    kwargs = dict(stage_kwargs)
    accumulation = kwargs.pop("accumulation", 1)
    NoHostSyncModule.steps_checked = 0
    model = module_with(
        NoHostSyncModule,
        preset="tiny",
        perceptual="none",
        feature_weights="random",
        ema_every=1,
        sampler=SamplerSettings(steps=2),
        **kwargs,
    )
    fit(model, images(), steps=4 // accumulation, accumulation=accumulation)
    assert NoHostSyncModule.steps_checked == 4 // accumulation


def test_stage_1b_chain_steps_make_no_host_read(tmp_path):
    first = module_with(preset="tiny", perceptual="none", feature_weights="random", freeze_encoder_after=None)
    trainer = fit(first, images(), steps=1)
    trainer.save_checkpoint(tmp_path / "1a.ckpt")
    NoHostSyncModule.steps_checked = 0
    model = module_with(
        NoHostSyncModule,
        preset="tiny",
        stage="1b",
        weights=str(tmp_path / "1a.ckpt"),
        perceptual="none",
        sample_loss="resnet50_logits",
        feature_weights="random",
        chain_steps=2,
        ema_every=1,
        sampler=SamplerSettings(steps=2),
    )
    fit(model, images(4, size=32), steps=2)
    assert NoHostSyncModule.steps_checked == 2


def test_a_nan_step_is_skipped_without_a_host_read():
    NoHostSyncModule.steps_checked = 0
    model = module_with(
        NoHostSyncModule,
        preset="tiny",
        perceptual="none",
        feature_weights="random",
        ema_every=1,
        freeze_encoder_after=None,
        sampler=SamplerSettings(steps=2),
    )
    fit(model, images(6, nan_at=2), steps=3)
    assert NoHostSyncModule.steps_checked == 3 and model.skipped_nonfinite == 1
