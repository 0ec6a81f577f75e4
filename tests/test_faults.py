"""Faults injected for real: a signal mid-run, a save that fails half-way, a file cut short, a NaN pixel,
a huge learning rate, a stream of empty shards. Each must cost nothing but the steps since the last save."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from flowmo.faults import EXIT_CHECKPOINT_FAILED, EXIT_DIVERGED, EXIT_PREEMPTED, NonFiniteTraining, latest_checkpoint
from flowmo.module import FlowMoModule
from module_fields import module_with
from run_faults import kill_past_a_checkpoint, step_of, training_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
warnings.filterwarnings("ignore")


@pytest.fixture
def shards(sample_shards) -> Path:
    return sample_shards


def fit_command(shards: Path, runs: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flowmo",
        "fit",
        "-c",
        str(CONFIGS / "base.yaml"),
        "-c",
        str(CONFIGS / "model/tiny.yaml"),
        "-c",
        str(CONFIGS / "stage/1a.yaml"),
        "-c",
        str(CONFIGS / "data/sample.yaml"),
        "--run_name",
        "fault",
        "--runs_dir",
        str(runs),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.max_steps",
        str(steps),
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--data.train_shards",
        str(shards / "train.json"),
        "--data.val_shards",
        str(shards / "val.json"),
        "--data.image_size",
        "32",
        "--data.batch_size",
        "2",
        "--model.loss.perceptual",
        "none",
        "--model.optim.ema_every",
        "1",
        *extra,
    ]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_signal_mid_run_saves_the_last_step_and_exits_non_zero(shards, tmp_path, signum):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        fit_command(shards, runs, 100_000, "--checkpoint.every_n_train_steps", "100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    events = runs / "fault" / "version_0"
    deadline = time.time() + 240
    while time.time() < deadline and not any(events.glob("events.out.tfevents.*")):
        time.sleep(0.5)
    time.sleep(4)  # some optimizer steps in
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output[-2000:]
    last = runs / "fault" / "checkpoints" / "last.ckpt"
    saved = step_of(last)
    assert saved > 0 and "Resume with --ckpt_path last" in output
    resumed = run(fit_command(shards, runs, saved + 2, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {last}" in resumed.stderr and step_of(last) == saved + 2


@pytest.mark.parametrize("accumulation", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_run_killed_mid_run_and_resumed_ends_bit_equal_to_an_uninterrupted_one(shards, tmp_path, accumulation):
    """Issue 8: SIGKILL (no chance to save) after steps past the last checkpoint, resume with --ckpt_path last:
    raw and EMA weights, Adam state and step equal the uninterrupted run's bit for bit. The runs use 1 and 2
    loader workers: the batches do not depend on the worker count either."""
    steps = 12

    def command(runs: Path, workers: int, *extra: str) -> list[str]:
        return fit_command(
            shards,
            runs,
            steps,
            "--checkpoint.every_n_train_steps",
            "4",
            "--data.num_workers",
            str(workers),
            "--trainer.accumulate_grad_batches",
            str(accumulation),
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir",
            str(runs / "csv"),
            "--trainer.logger.flush_logs_every_n_steps",
            "1",
            *extra,
        )

    uninterrupted = run(command(tmp_path / "a", 1))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    runs = tmp_path / "b"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command(runs, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    done, saved = kill_past_a_checkpoint(process, runs, runs / "fault")
    assert process.returncode == -signal.SIGKILL and 0 < saved < done < steps
    resumed = run(command(runs, 2, "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"training data resumes at micro-batch {saved * accumulation} " in resumed.stderr
    a = training_state(tmp_path / "a" / "fault" / "checkpoints" / "last.ckpt")
    b = training_state(runs / "fault" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys() and int(a["global_step"]) == steps
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{len(differing)} of {len(a)} tensors differ after the resume, e.g. {differing[:5]}"
    assert any(name.startswith("model/ema.") for name in a) and any(name.endswith("exp_avg_sq") for name in a)


def test_a_stop_inside_an_accumulation_group_waits_for_the_group_s_optimizer_step(tmp_path):
    """A signal during micro-batch 2, the first of the second group of 2: the save waits for micro-batch 3 and
    the group's step, so the checkpoint's step (2) and micro-batch count (4) agree. Saved at micro-batch 2, it
    lost that micro-batch's gradient and the resumed run stepped on micro-batch 3 alone."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from flowmo.faults import Preemption

    class SignalDuringBatch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 2:
                trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets

    callbacks = [SignalDuringBatch(), Preemption(), ModelCheckpoint(tmp_path, every_n_train_steps=100)]
    trainer = L.Trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(_tiny(), torch.utils.data.DataLoader(torch.rand(16, 3, 32, 32) * 2 - 1, batch_size=2))
    checkpoint = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    micro_batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    assert (checkpoint["global_step"], micro_batches) == (2, 4)


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # a real run in a subprocess; the fast suite stays under four minutes
def test_a_save_that_fails_half_way_keeps_the_previous_checkpoint(shards, tmp_path):
    runs = tmp_path / "runs"
    first = run(fit_command(shards, runs, 2, "--checkpoint.every_n_train_steps", "2"))
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = runs / "fault" / "checkpoints"
    last = checkpoints / "last.ckpt"
    before = last.read_bytes()
    # the resumed run may write logs, but no file larger than half a checkpoint: its step-4 save dies mid-write
    failed = run(
        fit_command(shards, runs, 4, "--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last"),
        preexec_fn=_limit_file_size(len(before) // 2),
    )
    assert failed.returncode == EXIT_CHECKPOINT_FAILED, failed.stderr[-2000:]
    assert "could not write the checkpoint" in failed.stderr and "checkpoints are intact" in failed.stderr
    assert last.read_bytes() == before and step_of(last) == 2  # the previous last.ckpt, byte for byte
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]  # no temporary file left behind


@pytest.mark.slow
def test_resume_skips_a_checkpoint_cut_short(shards, tmp_path):
    runs = tmp_path / "runs"
    assert run(fit_command(shards, runs, 4, "--checkpoint.every_n_train_steps", "2")).returncode == 0
    checkpoints = runs / "fault" / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # what a kill mid-copy leaves
    os.utime(last)  # and it is the newest file
    reports = []
    assert latest_checkpoint(runs / "fault", report=reports.append) == checkpoints / "step0000004.ckpt"
    assert "unreadable" in reports[0]
    resumed = run(fit_command(shards, runs, 6, "--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "last.ckpt is unreadable" in resumed.stderr and step_of(last) == 6
    assert not list(checkpoints.glob("last-v*.ckpt"))  # one last.ckpt, no versioned copy beside it


@pytest.mark.slow
def test_ckpt_path_last_with_nothing_to_resume_says_so(shards, tmp_path):
    started = run(fit_command(shards, tmp_path / "runs", 1, "--ckpt_path", "last"))
    assert started.returncode == 0 and "no checkpoint in" in started.stderr and "starting from step 0" in started.stderr


@pytest.mark.slow  # a real run in a subprocess; the fast suite stays under four minutes
def test_a_huge_learning_rate_stops_the_run_with_nothing_non_finite_saved(shards, tmp_path):
    runs = tmp_path / "runs"
    result = run(
        fit_command(
            shards,
            runs,
            200,
            "--model.optim.lr",
            "1e3",
            "--checkpoint.every_n_train_steps",
            "1",
            "--model.optim.max_nonfinite_steps",
            "3",
        )
    )
    assert result.returncode == EXIT_DIVERGED, result.stderr[-2000:]
    assert "3 optimizer steps in a row" in result.stderr and "resume with --ckpt_path last" in result.stderr
    saved = sorted((runs / "fault" / "checkpoints").glob("*.ckpt"))
    for path in saved:  # every checkpoint written is finite, last.ckpt included
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def _tiny(**kwargs) -> FlowMoModule:
    return module_with(
        **{"preset": "tiny", "perceptual": "none", "freeze_encoder_after": None, "ema_every": 1, **kwargs}
    )


def test_one_nan_pixel_skips_one_step_and_moves_nothing():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    images[2, 0, 5, 5] = float("nan")  # batch 1 of 3
    model = _tiny(lr=1e-3)
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 1:
                before["raw"] = [p.detach().clone() for p in module.tokenizer.parameters()]
                before["ema"] = [p.detach().clone() for p in module.ema.module.parameters()]
                before["adam"] = {k: v["exp_avg"].clone() for k, v in enumerate(trainer.optimizers[0].state.values())}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 1:
                assert all(torch.equal(a, b) for a, b in zip(before["raw"], module.tokenizer.parameters()))
                assert all(torch.equal(a, b) for a, b in zip(before["ema"], module.ema.module.parameters()))
                after = {k: v["exp_avg"] for k, v in enumerate(trainer.optimizers[0].state.values())}
                assert all(torch.equal(before["adam"][k], after[k]) for k in after)
                before["checked"] = True

    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Snapshot()],
    )
    trainer.fit(model, torch.utils.data.DataLoader(images, batch_size=2))
    # the skipped step still counts toward max_steps (Lightning counts it): 3 batches, 3 steps, 2 updates
    assert before["checked"] and model.skipped_nonfinite == 1 and trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in model.tokenizer.parameters())


def test_nonfinite_steps_in_a_row_raise_with_the_terms_named():
    images = torch.full((4, 3, 32, 32), float("nan"))
    trainer = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(NonFiniteTraining, match="2 optimizer steps in a row .* non-finite .*flow"):
        trainer.fit(_tiny(max_nonfinite_steps=2), torch.utils.data.DataLoader(images, batch_size=2))


def test_a_stream_of_empty_shards_fails_within_seconds(tmp_path):
    empty = []
    for index in range(3):
        path = tmp_path / f"empty-{index}.tar"
        tarfile.open(path, "w").close()
        empty.append(str(path))
    from flowmo.data import FlowMoDataModule

    pattern = f"{tmp_path}/empty-{{0..2}}.tar"
    data = FlowMoDataModule(pattern, pattern, image_size=32, batch_size=2, num_workers=0)
    data.setup("fit")
    started = time.time()
    with pytest.raises(RuntimeError, match="the training shards yield no sample .*empty-0.tar"):
        next(iter(data.train_dataloader()))
    assert time.time() - started < 10


def test_sixteen_bit_and_transparent_images_decode_faithfully():
    import io

    import numpy as np
    from PIL import Image

    from flowmo.data.transforms import decode_rgb

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    encoded = io.BytesIO()
    Image.fromarray(ramp).save(encoded, format="PNG")  # mode I;16
    pixels = np.array(decode_rgb(encoded.getvalue()))
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 1  # scaled, not all white
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3] = 255, 255  # red, transparent in the lower half
    encoded = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(encoded, format="PNG")
    pixels = np.array(decode_rgb(encoded.getvalue()))
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[7, 7].tolist() == [255, 255, 255]  # on white


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_is_refused_naming_the_fields(shards, tmp_path):
    runs = tmp_path / "runs"
    assert run(fit_command(shards, runs, 1)).returncode == 0
    other = run(fit_command(shards, runs, 2, "-c", str(CONFIGS / "model/demo.yaml"), "--ckpt_path", "last"))
    assert other.returncode == 2, other.stderr[-2000:]
    assert "another architecture" in other.stderr and "code_dim: 18 -> 72" in other.stderr
    assert "Traceback" not in other.stderr
    from flowmo.errors import UserError

    with pytest.raises(UserError, match="code_dim: 18 -> 72; rope_theta: 10000.0 -> 100.0"):
        module_with(preset="demo", perceptual="none", weights=str(runs / "fault" / "checkpoints" / "last.ckpt"))


def test_user_errors_are_one_sentence_without_a_traceback(shards, tmp_path, capsys):
    from flowmo.commands import main

    assert main(fit_command(shards, tmp_path, 1, "--data.image_size", "30")[3:]) == 2
    assert "data.image_size 30 is not a multiple of the patch size 4; use 28 or 32." in capsys.readouterr().err
    assert main(fit_command(shards, tmp_path, 1, "--trainer.max_step", "1")[3:]) == 2  # no prefix matching
    err = capsys.readouterr().err
    assert "unrecognized arguments: --trainer.max_step 1" in err and "usage:" not in err


def test_latest_checkpoint_includes_slurm_requeue_saves(tmp_path):
    """Lightning's SLURM requeue writes <run>/hpc_ckpt_N.ckpt; `--ckpt_path last` takes it when it holds the most
    steps, and not when it holds fewer, whichever file is newer (Lightning itself prefers it by its name)."""
    run_dir = tmp_path / "run"
    fake_run(run_dir, {"checkpoints/last.ckpt": 100, "hpc_ckpt_1.ckpt": 130})
    (run_dir / "checkpoints" / ".last.ckpt.tmp-123").write_bytes(b"half")  # a killed save's leftover: ignored
    assert latest_checkpoint(run_dir) == run_dir / "hpc_ckpt_1.ckpt"
    fake_run(run_dir, {"checkpoints/last.ckpt": 139, "hpc_ckpt_1.ckpt": 130})  # the hpc file is the newer one
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "last.ckpt"


def fake_run(run_dir: Path, files: dict[str, int]) -> None:
    """Checkpoint stand-ins holding only their step, the last one given the newest file."""
    for age, (name, step) in enumerate(reversed(files.items())):
        path = run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step}, path)
        os.utime(path, (time.time() - age, time.time() - age))


def test_a_truncated_test_shard_reports_the_images_lost(sample_shards, tmp_path, monkeypatch):
    import json
    import shutil

    from flowmo.commands import main

    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    manifest = json.loads((shards / "val.json").read_text())
    first = shards / manifest["shards"][0]["url"]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # a copy cut short
    monkeypatch.chdir(tmp_path)
    args = [
        "test",
        "-c",
        str(CONFIGS / "base.yaml"),
        "-c",
        str(CONFIGS / "model/tiny.yaml"),
        "-c",
        str(CONFIGS / "data/sample.yaml"),
        "-c",
        str(CONFIGS / "eval/paper.yaml"),
        "--data.val_shards",
        str(shards / "val.json"),
        "--data.image_size",
        "32",
        "--model.eval.sampler.steps",
        "1",
        "--model.eval.lpips_nets",
        "[]",
        "--model.eval.rfid",
        "false",
        "--trainer.precision",
        "32-true",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--run_name",
        "cut",
        "--runs_dir",
        str(tmp_path / "runs"),
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "results" / "cut" / "metrics.json").read_text())
    expected = sum(shard["num_samples"] for shard in manifest["shards"])
    assert report["images_lost"] == expected - report["num_images"] > 0
    assert f"of the {expected} test images in the manifest were not read" in report["warning"]


def test_checkpoint_retention_keeps_the_newest_and_every_nth(shards, tmp_path):
    """A real fit saving every step: with the newest 2 and every 3rd kept, steps 3, 6 and 7 remain (and last)."""
    runs = tmp_path / "runs"
    policy = tmp_path / "retention.yaml"  # replaces base.yaml's callback list: this policy alone
    policy.write_text(
        "trainer:\n  callbacks:\n    - class_path: flowmo.callbacks.CheckpointRetention\n"
        "      init_args: {keep_last: 2, keep_every: 3}\n"
    )
    result = run(fit_command(shards, runs, 7, "--checkpoint.every_n_train_steps", "1", "-c", str(policy)))
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(path.name for path in (runs / "fault" / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step0000003.ckpt", "step0000006.ckpt", "step0000007.ckpt"], names


# ------------------------------------------------------------------------------------------- one run per directory
def test_a_second_start_of_a_run_is_refused_before_anything_is_built(tmp_path, capsys):
    """No shards exist: had the refusal come after the data module was built, it would name them instead."""
    from flowmo.commands import main

    runs = tmp_path / "runs"
    fake_run(runs / "fault", {"checkpoints/step0000040.ckpt": 40, "checkpoints/last.ckpt": 60})
    before = {path: path.read_bytes() for path in (runs / "fault").rglob("*.ckpt")}
    assert main(fit_command(tmp_path / "no-shards", runs, 3)[3:]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {runs / 'fault'} already holds a run (newest checkpoint: {runs / 'fault/checkpoints/last.ckpt'}, "
        "step 60); continue it with --ckpt_path last (make ... RESUME=1), or start another with a new --run_name "
        "(--overwrite starts this one over, moving its files aside)."
    ) in err and "Traceback" not in err
    assert {path: path.read_bytes() for path in (runs / "fault").rglob("*.ckpt")} == before


def claim(run_dir: Path, ckpt_path: str | None, overwrite: bool):
    """What `flowmo fit` does with a run directory before building anything: (checkpoint to resume, lock held)."""
    from flowmo.run_dir import claim, start_of

    start = start_of(run_dir, ckpt_path, overwrite)
    return start.ckpt_path, claim(run_dir, start)


def test_overwrite_moves_the_earlier_run_aside_and_a_resume_keeps_one_lineage(tmp_path, monkeypatch):
    from flowmo.errors import UserError

    run_dir = tmp_path / "run"
    fake_run(run_dir, {"checkpoints/step0000020.ckpt": 20, "hpc_ckpt_1.ckpt": 50, "checkpoints/last.ckpt": 60})
    (run_dir / "version_0").mkdir()
    before = {path.relative_to(run_dir): path.read_bytes() for path in run_dir.rglob("*.ckpt")}
    with pytest.raises(UserError, match="give one of the two"):
        claim(run_dir, "last", overwrite=True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank the launching process started: neither locks nor moves
    assert claim(run_dir, None, overwrite=True) == (None, None) and (run_dir / "checkpoints").is_dir()
    monkeypatch.delenv("LOCAL_RANK")
    ckpt_path, lock = claim(run_dir, None, overwrite=True)
    lock.release()
    (superseded,) = run_dir.glob("superseded-*")
    assert ckpt_path is None and sorted(path.name for path in run_dir.iterdir()) == [".fit.lock", superseded.name]
    assert {path.relative_to(superseded): path.read_bytes() for path in superseded.rglob("*.ckpt")} == before
    assert (superseded / "version_0").is_dir()  # the logs too: the new run starts at version_0

    # a resume from an older checkpoint of the run moves the later ones aside: `last` must not jump back to them
    fake_run(
        run_dir,
        {
            "checkpoints/step0000020.ckpt": 20,
            "checkpoints/step0000040.ckpt": 40,
            "hpc_ckpt_1.ckpt": 50,
            "checkpoints/last.ckpt": 60,
        },
    )
    older = run_dir / "checkpoints" / "step0000020.ckpt"
    ckpt_path, lock = claim(run_dir, str(older), overwrite=False)
    lock.release()
    assert ckpt_path == str(older)
    branch = next(folder for folder in run_dir.glob("superseded-*") if folder != superseded)
    assert sorted(path.name for path in branch.rglob("*.ckpt")) == ["hpc_ckpt_1.ckpt", "last.ckpt", "step0000040.ckpt"]
    assert list((run_dir / "checkpoints").iterdir()) == [older] and not list(run_dir.glob("hpc_ckpt_*"))
    fake_run(tmp_path / "other", {"checkpoints/last.ckpt": 7})
    with pytest.raises(UserError, match="already holds a run of its own .* under a new --run_name"):
        claim(run_dir, str(tmp_path / "other" / "checkpoints" / "last.ckpt"), overwrite=False)


def test_a_requeued_job_without_ckpt_path_resumes_the_most_steps(tmp_path, monkeypatch):
    from flowmo.errors import UserError

    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    fake_run(run_dir, {"checkpoints/last.ckpt": 69, "hpc_ckpt_1.ckpt": 60})  # the hpc file is the newer one
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "lo-1a")
    with pytest.raises(UserError, match="already holds a run"):  # a first start under SLURM: not a requeue
        claim(run_dir, None, overwrite=False)
    older, elsewhere = run_dir / "checkpoints" / "step0000040.ckpt", tmp_path / "other" / "last.ckpt"
    fake_run(run_dir, {"checkpoints/step0000040.ckpt": 40})
    fake_run(elsewhere.parent.parent, {"other/last.ckpt": 500})
    for variable in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.setenv(variable, "1")
        # the job's command line was for its first start: --overwrite, a step file, another run's checkpoint
        for first_start in (
            dict(ckpt_path=None, overwrite=True),
            dict(ckpt_path=str(older), overwrite=False),
            dict(ckpt_path=str(elsewhere), overwrite=False),
        ):
            ckpt_path, lock = claim(run_dir, **first_start)
            lock.release()
            assert ckpt_path == str(run_dir / "checkpoints" / "last.ckpt"), first_start
            assert older.exists()  # nothing moved aside: the newest state goes on
        monkeypatch.delenv(variable)

    from flowmo.run_dir import claim as claim_run
    from flowmo.run_dir import start_of

    start = start_of(run_dir, "last", overwrite=False)  # while parsing: reads only
    assert not (tmp_path / "nowhere").exists() and start_of(tmp_path / "nowhere", None, False).ckpt_path is None
    fake_run(run_dir, {"hpc_ckpt_2.ckpt": 70})  # saved by a process that ended before this start's lock
    with pytest.raises(UserError, match="changed while this start was reading it"):
        claim_run(run_dir, start)


def test_the_run_lock_names_its_holder_and_goes_with_it(tmp_path):
    """The holder is another process (a lockf lock is per process), SIGKILLed: nothing stale is left behind."""
    import socket

    from flowmo.errors import UserError
    from flowmo.run_dir import RunLock

    ready, told = os.pipe()
    child = os.fork()
    if child == 0:  # the holder: lock, say so, wait to be killed
        RunLock(tmp_path).acquire()
        os.write(told, b"1")
        time.sleep(60)
        os._exit(0)
    assert os.read(ready, 1) == b"1"
    for attempt in (RunLock(tmp_path).probe, RunLock(tmp_path).acquire):  # the probe: while parsing, creating nothing
        with pytest.raises(UserError, match=f"is being trained by process {child} on host {socket.gethostname()} "):
            attempt()
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    RunLock(tmp_path).probe()
    RunLock(tmp_path).acquire().release()
    RunLock(tmp_path / "nowhere").probe()
    assert not (tmp_path / "nowhere").exists()


def test_retention_never_deletes_a_step_the_run_has_not_reached(tmp_path):
    from flowmo.callbacks import CheckpointRetention

    for step in (1, 2, 3, 4, 9):
        (tmp_path / f"step{step:07d}.ckpt").touch()
    removable = CheckpointRetention(keep_last=2, keep_every=None).removable(tmp_path, step_now=4)
    assert sorted(path.name for path in removable) == ["step0000001.ckpt", "step0000002.ckpt"]  # not step 9's file


def _wait_for(condition, what: str, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None and time.time() < deadline, f"{what}: the run ended or took too long"
        time.sleep(0.2)


def _bytes(folder: Path) -> dict[Path, bytes]:
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*.ckpt")}


@pytest.mark.slow
def test_a_second_start_a_concurrent_start_and_a_start_over_for_real(shards, tmp_path):
    """Real `flowmo fit` processes: the second start is refused with the first run's files unchanged, byte for byte;
    a start beside a run still training stops at once naming it; its SIGKILL leaves no lock behind; --overwrite
    starts over with the earlier files moved aside, not deleted."""
    import socket

    runs = tmp_path / "runs"
    run_dir = runs / "fault"
    first = run(fit_command(shards, runs, 4, "--checkpoint.every_n_train_steps", "2"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = _bytes(run_dir)
    second = run(fit_command(shards, runs, 6))
    assert second.returncode == 2 and second.stderr.strip().splitlines()[-1] == (
        f"error: {run_dir} already holds a run (newest checkpoint: {run_dir / 'checkpoints/last.ckpt'}, step 4); "
        "continue it with --ckpt_path last (make ... RESUME=1), or start another with a new --run_name (--overwrite "
        "starts this one over, moving its files aside)."
    ), second.stderr[-2000:]
    assert _bytes(run_dir) == before and sorted(name.name for name in before) == [
        "last.ckpt",
        "step0000002.ckpt",
        "step0000004.ckpt",
    ]

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    training = subprocess.Popen(
        fit_command(shards, runs, 100_000, "--ckpt_path", "last"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = run_dir / ".fit.lock"
    _wait_for(lambda: f"process {training.pid} " in lock.read_text(), "the lock", training)
    started = time.time()
    beside = run(fit_command(shards, runs, 6, "--ckpt_path", "last"))
    stopped_after = time.time() - started
    training.kill()
    training.wait()
    assert beside.returncode == 2, beside.stderr[-2000:]
    assert f"is being trained by process {training.pid} on host {socket.gethostname()}" in beside.stderr
    assert stopped_after < 30, stopped_after  # the time to import torch and parse; nothing is built

    before = _bytes(run_dir)
    over = run(fit_command(shards, runs, 1, "--overwrite"))  # the SIGKILLed run left no lock to refuse it
    assert over.returncode == 0, over.stderr[-2000:]
    (superseded,) = run_dir.glob("superseded-*")
    assert _bytes(superseded) == before and step_of(run_dir / "checkpoints" / "last.ckpt") == 1
    print(f"concurrent start refused after {stopped_after:.1f} s")


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_from_the_newest_state(shards, tmp_path):
    """SLURM emulated: its variables, SIGUSR1 (Lightning saves hpc_ckpt_1 and calls `scontrol requeue`, a stand-in
    here), training on, SIGTERM (last.ckpt, newer); the requeued job, started again without --ckpt_path, restores
    last.ckpt (Lightning alone restored hpc_ckpt_1)."""
    from run_faults import logged_step

    stand_in = tmp_path / "bin" / "scontrol"
    stand_in.parent.mkdir()
    stand_in.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    stand_in.chmod(0o755)
    slurm = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "lo-1a",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        **slurm,
        "PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}",
    }
    runs = tmp_path / "runs"
    csv = (
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(runs / "csv"),
        "--trainer.logger.flush_logs_every_n_steps",
        "1",
        "--checkpoint.every_n_train_steps",
        "100000",
    )
    job = subprocess.Popen(
        fit_command(shards, runs, 100_000, *csv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for(lambda: logged_step(runs) >= 3, "the first steps", job)
    job.send_signal(signal.SIGUSR1)
    hpc = runs / "fault" / "hpc_ckpt_1.ckpt"
    _wait_for(lambda: (tmp_path / "scontrol.log").is_file(), "the requeue", job)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    _wait_for(lambda: logged_step(runs) >= step_of(hpc) + 3, "steps past the hpc save", job)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == EXIT_PREEMPTED
    last = runs / "fault" / "checkpoints" / "last.ckpt"
    saved = step_of(last)
    assert saved > step_of(hpc)
    requeued = subprocess.run(
        fit_command(shards, runs, saved + 1, *csv),
        env={**env, "SLURM_RESTART_COUNT": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert f"Restored all states from the checkpoint at {last}" in requeued.stderr
    assert f"training data resumes at micro-batch {saved} " in requeued.stderr and step_of(last) == saved + 1
