"""What the kill-and-resume tests share (tests/test_faults.py, one process; tests/test_ddp_resume.py, two ranks):
reading a run's progress from its CSV log and checkpoints, killing it past a checkpoint, and the training state of
a checkpoint to compare bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from flowmo.faults import latest_checkpoint


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def logged_step(runs: Path) -> int:
    """The newest optimizer step in the CSV logs under `runs`; a row logged at step s follows optimizer step s + 1,
    whose checkpoint (if it has one) is already written. -1 before the first row."""
    steps = [-1]
    for path in runs.glob("**/metrics.csv"):
        header, *rows = path.read_text().splitlines() or [""]
        column = header.split(",").index("step") if "step" in header.split(",") else None
        for fields in (row.split(",") for row in rows):
            if column is not None and len(fields) > column and fields[column].isdigit():  # not a half-written row
                steps.append(int(fields[column]))
    return max(steps) + 1


def newest_checkpoint_step(run_dir: Path) -> int:
    found = latest_checkpoint(run_dir, report=lambda message: None)
    return -1 if found is None else step_of(found)


def kill_past_a_checkpoint(
    process: subprocess.Popen, runs: Path, run_dir: Path, whole_group: bool = False
) -> tuple[int, int]:
    """SIGKILL once the run has finished optimizer steps past its newest checkpoint (checked while the process is
    stopped, so the two numbers cannot move under the check); `whole_group`: every DDP rank (the process was started
    with start_new_session). Returns (steps done, checkpoint step)."""
    group = os.getpgid(process.pid) if whole_group else None

    def send(signum: int) -> None:
        os.killpg(group, signum) if whole_group else process.send_signal(signum)

    while process.poll() is None:
        if logged_step(runs) > max(newest_checkpoint_step(run_dir), 0):
            send(signal.SIGSTOP)
            done, saved = logged_step(runs), newest_checkpoint_step(run_dir)
            if saved > 0 and done > saved:
                send(signal.SIGKILL)
                process.wait()
                return done, saved
            send(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"the run ended (exit {process.returncode}) before it could be killed mid-run")


def training_state(path: Path) -> dict[str, torch.Tensor]:
    """Raw and EMA weights, Adam's moments and step counts, every rank's loss-noise generator and the step."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = {f"model/{k}": v for k, v in checkpoint["state_dict"].items()}
    for param, moments in checkpoint["optimizer_states"][0]["state"].items():
        state.update({f"adam/{param}/{name}": torch.as_tensor(value) for name, value in moments.items()})
    for rank, generator in enumerate(checkpoint["flowmo_noise_generators"]):
        state[f"noise/rank{rank}"] = generator
    state["global_step"] = torch.tensor(checkpoint["global_step"])
    return state
