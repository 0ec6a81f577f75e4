"""Smoke test of the model benchmark (flowmo.bench): it runs on CPU, writes bench.json rows of the documented schema and
profiles each workload, and its training step is the module's own update. No timing is asserted."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flowmo.bench.model
from flowmo.bench import workloads
from flowmo.flow import SAMPLERS
from module_fields import module_with

ROW_FIELDS = (
    "preset",
    "stage",
    "device",
    "dtype",
    "batch",
    "image_size",
    "ms",
    "images_per_s",
    "peak_mem_mb",
    "model_flops",
    "utilisation",
)


def load_script():
    return flowmo.bench.model


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def run(bench, out: Path, *extra: str) -> list[dict]:
    argv = [
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--device",
        "cpu",
        "--matmul-size",
        "256",
        "--threads",
        "1",
        "--json",
        str(out),
        *extra,
    ]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_writes_rows_of_the_schema_for_every_stage_with_a_profile(tmp_path, capsys):
    bench = load_script()
    rows = run(bench, tmp_path / "bench.json", "--profile")
    by_stage = {row["stage"]: row for row in rows}
    assert set(by_stage) == {"1a", "1b", "encode", "decode"}
    for row in rows:
        assert all(name in row for name in ROW_FIELDS), sorted(set(ROW_FIELDS) - set(row))
        assert (row["preset"], row["dtype"], row["batch"], row["image_size"]) == ("tiny", "fp32", 2, 32)
        for key in ("ms", "images_per_s", "model_flops", "utilisation"):
            assert positive(row[key]), (row["stage"], key, row[key])
        assert row["peak_mem_mb"] is None or row["peak_mem_mb"] >= 0
        groups = row["profile"]["groups_ms"]
        assert "matmuls" in groups and abs(sum(groups.values()) - row["profile"]["total_ms"]) < 1e-6
    assert "optimizer, projection, EMA" in by_stage["1a"]["profile"]["groups_ms"]  # the step includes Adam
    # Shape-level FLOP relations that hold whatever the machine: a step is more than its forward passes.
    assert by_stage["1a"]["model_flops"] > 2 * by_stage["encode"]["model_flops"]
    assert by_stage["decode"]["model_flops"] > 25 * by_stage["encode"]["model_flops"] / 2
    printed = capsys.readouterr().out
    assert "util" in printed and "top operators" in printed


def test_rows_accumulate_and_a_rerun_replaces_its_own(tmp_path):
    bench = load_script()
    out = tmp_path / "bench.json"
    run(bench, out, "--workloads", "encode")
    run(bench, out, "--workloads", "encode", "--label", "after")
    rows = run(bench, out, "--workloads", "encode", "decode")
    assert sorted((row["stage"], row["label"]) for row in rows) == [("decode", ""), ("encode", ""), ("encode", "after")]
    assert len(run(bench, out, "--workloads", "encode", "--fresh")) == 1


@pytest.mark.slow
def test_scaling_rows_cover_batch_and_image_size(tmp_path):
    bench = load_script()
    rows = run(bench, tmp_path / "bench.json", "--workloads", "encode", "--scaling", "--scaling-batches", "1", "2")
    scaled = {(row["stage"], row["batch"], row["image_size"]) for row in rows}
    assert {("1a", 1, 32), ("decode", 2, 32), ("1a", 2, 16), ("decode", 2, 64)} <= scaled


def test_decode_flops_are_its_network_evaluations_times_one_call():
    assert SAMPLERS["paper"].nfe == 31  # 25 steps + 6 guided ones inside the CFG interval (method §4)
    flops = workloads.flops_per_image("tiny", 2, "off", None)
    assert flops["decode"] == 31 * flops["decoder_call"]


def test_the_bench_times_the_training_modules_own_update_and_recipes():
    """Not a copy: the bench's step is flowmo.optim.TrainingUpdate + flowmo.nonfinite.NonFiniteGuard, as FlowMoModule's,
    and its recipes are LossRecipe.for_stage's."""
    from flowmo.losses import LossRecipe
    from flowmo.nonfinite import NonFiniteGuard
    from flowmo.optim import TrainingUpdate

    bundle = workloads.build_bundle("tiny", "cpu", workloads.build_feature_nets("off", "cpu"), None, "off")
    bundle.attach_update(torch.device("cpu"))
    module = module_with(preset="tiny", perceptual="none")
    assert type(bundle.update) is type(module.update) is TrainingUpdate
    assert type(bundle.guard) is type(module.guard) is NonFiniteGuard
    assert bundle.recipes["1a"] == LossRecipe(perceptual="none").for_stage("1a") == module.recipe
    before = [p.detach().clone() for p in bundle.tokenizer.parameters()]
    images = workloads.make_images(bundle, 2, "cpu")
    workloads.optimizer_step(bundle, images, "1a")
    assert bundle.update.steps == 1 and any(
        not torch.equal(a, b) for a, b in zip(before, bundle.tokenizer.parameters())
    )


def test_a_check_past_its_deadline_is_stopped_and_the_command_fails(tmp_path, monkeypatch):
    """A hung check (here a process that sleeps, with a child of its own) is killed at its deadline with its process
    group, reported, and the command exits 1; the budget also stops the checks after it."""
    from flowmo.bench import gpu_check

    sleeper = [sys.executable, "-c", "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"]
    monkeypatch.setattr(gpu_check, "child_argv", lambda args, name: sleeper)
    monkeypatch.setattr(gpu_check, "DEADLINES_S", {"memory": 2, "syncs": 2, "1b-decode": 2, "compile": 2})
    started = time.monotonic()
    assert gpu_check.main(["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path), "--budget-s", "21"]) == 1
    assert time.monotonic() - started < 30
    report = (tmp_path / "report.md").read_text()
    assert "memory: stopped at its 2 s deadline" in report and "compile: not run (21 s budget spent)" in report
    assert "did not pass: memory" in report
    assert subprocess.run(["pgrep", "-f", "sleep 60"], capture_output=True).returncode == 1  # no orphan left


def test_the_cuda_profile_split_counts_each_kernel_once():
    """On a GPU the profiler holds each kernel twice: as a kernel row and in the self device time of the operator that
    launched it. A recorded-shape event list: a matmul (2 ms), SDPA flash (3 ms), a Triton kernel of a compiled graph
    that no aten operator launched (1 ms), a user annotation; the total is 6 ms, not 11."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from flowmo.bench.measure import UNATTRIBUTED, split_profile

    def row(key, device_type, device_us, cpu_us=0.0, annotation=False):
        return SimpleNamespace(
            key=key,
            device_type=device_type,
            self_device_time_total=device_us,
            self_cpu_time_total=cpu_us,
            is_user_annotation=annotation,
        )

    events = [
        row("aten::mm", DeviceType.CPU, 2000, 50),
        row("aten::_scaled_dot_product_flash_attention", DeviceType.CPU, 3000, 40),
        row("aten::view", DeviceType.CPU, 0, 5),
        row("sm90_xmma_gemm_bf16bf16_bf16f32", DeviceType.CUDA, 2000),
        row("flash_fwd_kernel", DeviceType.CUDA, 3000),
        row("triton_per_fused_native_layer_norm_0", DeviceType.CUDA, 1000),
        row("forward", DeviceType.CUDA, 6000, annotation=True),
    ]
    split = split_profile(events, on_device=True)
    assert split["total_ms"] == pytest.approx(6.0)
    assert split["groups_ms"] == pytest.approx({"attention": 3.0, "matmuls": 2.0, UNATTRIBUTED: 1.0})
    assert list(split["top_ops_ms"])[0] == "aten::_scaled_dot_product_flash_attention"
    on_cpu = split_profile(events[:3], on_device=False)
    assert on_cpu["total_ms"] == pytest.approx(0.095) and on_cpu["clock"] == "cpu"
