"""A machine with no network and torch already installed (a lent GPU, a cluster's compute node) runs flowmo as it is:
`make ... PYTHON=<interpreter>` makes no .venv and downloads nothing, `scripts/deps.py` installs only what that
interpreter lacks from a wheels folder, and `make gpu-check` fails its preflight within seconds, naming what is
missing. The make runs happen in a fresh copy of the working tree (no .venv) inside `unshare -n`: no network at all."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from working_copy import fresh_copy

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "--device cpu --preset tiny --skip compile syncs 1b-decode"

sys.path.insert(0, str(ROOT / "scripts"))
import deps  # noqa: E402  (scripts/deps.py: a script, not part of the package)


def offline_available() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not offline_available(), reason="unshare -n is refused here (needs root)")


def offline_make(copy: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "-n", "make", "-C", str(copy), *args], capture_output=True, text=True, timeout=timeout
    )


def interpreter_without(module: str, tmp_path: Path) -> Path:
    """This interpreter, with `module` made unimportable (a meta-path finder that refuses it, put first)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n\n\nclass Refuse:\n    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {module!r}:\n"
        f'            raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n\n\n'
        "sys.meta_path.insert(0, Refuse())\n"
    )
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{blocker}:$PYTHONPATH" exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@needs_unshare
def test_gpu_check_without_lpips_stops_in_its_preflight_naming_it(tmp_path):
    copy = fresh_copy(tmp_path / "clone")
    python = interpreter_without("lpips", tmp_path)
    started = time.monotonic()
    result = offline_make(
        copy, "gpu-check", f"PYTHON={python}", f"OUT={tmp_path / 'out'}", f"GPU_CHECK_ARGS={SMOKE}", timeout=120
    )
    assert result.returncode != 0 and time.monotonic() - started < 120
    assert "preflight: failed" in result.stdout and "cannot import lpips;" in result.stdout, result.stdout
    assert "make wheels" in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert not (copy / ".venv").exists()


@pytest.mark.slow
@needs_unshare
def test_gpu_check_runs_offline_end_to_end_on_the_cpu(tmp_path):
    """`make gpu-check` is for a lent GPU; offline, with an interpreter that has everything, on tiny and the CPU every
    check but compile (inductor: minutes here) and the CUDA sync mode runs, each in its own process, and reports."""
    copy = fresh_copy(tmp_path / "clone")
    out = tmp_path / "out"
    started = time.monotonic()
    args = "--device cpu --preset tiny --checkpointing blocks --warmup 0 --iters 1 --skip compile"
    result = offline_make(
        copy, "gpu-check", f"PYTHON={sys.executable}", f"OUT={out}", f"GPU_CHECK_ARGS={args}", timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "report.md").read_text()
    for expected in (
        "preflight: CPU",
        "1a micro-batch 8 (blocks): peak allocated",
        "planner (1 rank",
        "profile split",
        "host syncs: not measured",
        "1b micro-batch 4:",
        "decode fast sampler, batch 32:",
        "every check passed",
    ):
        assert expected in report, report
    assert "failed" not in report, report
    rows = json.loads((out / "bench.json").read_text())
    assert {row["stage"] for row in (rows["rows"] if isinstance(rows, dict) else rows)} == {"1a", "1b", "decode"}
    assert not (copy / ".venv").exists()
    print(f"offline gpu-check: {time.monotonic() - started:.0f} s")


# ------------------------------------------------------------------------------------------- scripts/deps.py
def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")
    return path


def test_only_what_the_interpreter_lacks_is_installed_with_its_own_requirements(tmp_path):
    """pytest is installed here at a version that satisfies it; a missing package comes with the requirements its
    wheel names (an extra's included, another extra's not); a wrong version is replaced."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    wanted = fake_wheel(
        folder,
        "flowmo_test_missing",
        "1.0",
        ("flowmo_test_dep>=2", "flowmo_test_extra_dep; extra == 'fast'", "flowmo_test_never; extra == 'docs'"),
    )
    dep = fake_wheel(folder, "flowmo_test_dep", "2.1")
    extra_dep = fake_wheel(folder, "flowmo_test_extra_dep", "0.3")
    fake_wheel(folder, "flowmo_test_never", "1.0")
    fake_wheel(folder, "pytest", "1.0")  # installed here already (a satisfying version): not taken
    requirements = [deps.Requirement("flowmo_test_missing[fast]>=1"), deps.Requirement("pytest>=7")]
    assert deps.to_install(requirements, deps.wheel_index(folder)) == sorted([wanted, dep, extra_dep])
    with pytest.raises(deps.Missing, match=r"lacks pytest>=999 \(has "):  # the folder's 1.0 is too old as well
        deps.to_install([deps.Requirement("pytest>=999")], deps.wheel_index(folder))
    newer = fake_wheel(folder, "pytest", "999.1")
    assert deps.to_install([deps.Requirement("pytest>=999")], deps.wheel_index(folder)) == [newer]
    with pytest.raises(deps.Missing, match=r"lacks .*flowmo_test_absent.*make wheels"):
        deps.to_install(
            [deps.Requirement("flowmo_test_absent"), deps.Requirement("flowmo_test_missing")], deps.wheel_index(folder)
        )


def test_an_interpreter_without_torch_is_told_what_to_do(tmp_path):
    with pytest.raises(deps.Missing, match="install torch and torchvision for it"):
        deps.to_install([deps.Requirement("torch>=999")], {})
