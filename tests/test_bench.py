"""Smoke test of scripts/bench_model.py: it runs on CPU and reports every figure. No timing is asserted."""

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_bench_model_reports_every_workload(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--batch", "2", "--warmup", "1", "--iters", "1", "--device", "cpu",
            "--matmul-size", "256", "--threads", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())["reports"][0]
    assert report["decode_nfe"] == 31  # 25 steps + 6 guided ones inside the CFG interval (spec 4)
    assert positive(report["matmul_flops_per_s"]) and report["params"]["total"] > 0
    rows = {row["workload"]: row for row in report["rows"]}
    assert set(rows) == {"stage1a", "stage1b", "encode", "decode"}
    for row in rows.values():
        for key in ("ms", "images_per_s", "flops_per_image", "flops_per_s", "utilisation"):
            assert positive(row[key]), (row["workload"], key, row[key])
        assert row["peak_mib"] is None or row["peak_mib"] >= 0
    # Shape-level FLOP relations that hold whatever the machine: a step is more than its forward passes.
    assert rows["stage1a"]["flops_per_image"] > 2 * rows["encode"]["flops_per_image"]
    assert rows["decode"]["flops_per_image"] == 31 * report["decoder_call_flops_per_image"]
    printed = capsys.readouterr().out
    assert "stage1b" in printed and "util" in printed
