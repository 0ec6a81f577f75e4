"""Timing, peak memory, the reference matmul and the profile split of one call."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call after `warmup` untimed calls (compilation, allocator and cache warm-up)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)  # CUDA launches are asynchronous: time the work, not the launch
        seconds.append(time.perf_counter() - start)
    return seconds


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """GPU: max_memory_allocated (absolute, weights included). CPU: peak RSS growth over the start (Linux:
    the VmHWM high-water mark reset through /proc/self/clear_refs), else None."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield
        result["peak_mib"], result["memory_kind"] = (
            torch.cuda.max_memory_allocated(device) / 2**20,
            "cuda max allocated",
        )
        return
    baseline = _reset_rss_peak()
    yield
    peak = _proc_status_kib("VmHWM")
    ok = baseline is not None and peak is not None
    result["peak_mib"] = (peak - baseline) / 1024 if ok else None
    result["memory_kind"] = "RSS growth" if ok else "n/a"


def _reset_rss_peak() -> int | None:
    """Give freed heap back to the OS and restart the RSS high-water mark; returns the RSS now (KiB)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # else pages freed by the last workload hide this one's growth
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_kib("VmRSS")


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """The attainable-FLOP/s reference: an n x n matmul, median of `iters` timed calls."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = statistics.median(time_calls(lambda: torch.mm(a, b), device, warmup=2, iters=iters))
    return 2 * n**3 / seconds


# ------------------------------------------------------------------------------------------ where the time goes
# Operator groups of the --profile breakdown, matched on aten names (first match wins).
PROFILE_GROUPS = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax")),
    (
        "matmuls",
        ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::addmv"),
    ),
    ("optimizer, projection, EMA", ("_fused_adam", "_foreach_", "optimizer")),
    (
        "data movement",
        (
            "copy",
            "aten::cat",
            "aten::stack",
            "aten::clone",
            "aten::contiguous",
            "aten::to",
            "aten::index",
            "aten::fill_",
            "aten::zero",
            "aten::empty",
            "aten::slice",
            "aten::select",
            "aten::view",
            "aten::reshape",
            "aten::transpose",
            "aten::permute",
            "aten::expand",
            "aten::as_strided",
            "aten::t",
            "aten::split",
            "aten::chunk",
            "aten::unbind",
            "aten::unflatten",
            "aten::flatten",
            "aten::narrow",
            "aten::squeeze",
            "aten::unsqueeze",
            "aten::repeat",
            "aten::new_",
            "aten::resize",
            "aten::detach",
            "aten::alias",
        ),
    ),
    ("norms, RoPE, modulation (elementwise)", ("aten::",)),
)


def profile_group(op_name: str) -> str:
    for group, prefixes in PROFILE_GROUPS:
        if any(op_name.startswith(p) or (not p.startswith("aten::") and p in op_name) for p in prefixes):
            return group
    return "other (autograd, Python)"


def profile_call(fn: Callable[[], None], device: torch.device, top: int = 12) -> dict:
    """Self time per operator of one call (after the timed ones: warm) and its share per group."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        fn()
        synchronize(device)
    return split_profile(profiler.key_averages(), on_device=device.type == "cuda", top=top)


UNATTRIBUTED = "kernels no operator launched (compiled graphs, NCCL)"


def split_profile(events, on_device: bool, top: int = 12) -> dict:
    """Group shares of one profiled call; `events` are the profiler's rows (key, device_type, self times).

    On a GPU the rows hold each kernel twice: once as a kernel row and once in the self device time of the operator
    that launched it. The total is the kernel rows' sum (torch's own table counts the same), the groups come from the
    operator rows, and what no operator launched is a group of its own, so nothing is counted twice.
    """
    if on_device:
        kernels = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
        ops = {
            e.key: e.self_device_time_total / 1e3
            for e in events
            if e.device_type == DeviceType.CPU and e.self_device_time_total > 0
        }
        total = sum(e.self_device_time_total for e in kernels) / 1e3
        unattributed = total - sum(ops.values())
        if unattributed > 1e-3 * total:
            ops[UNATTRIBUTED] = unattributed
    else:
        ops = {e.key: e.self_cpu_time_total / 1e3 for e in events if e.self_cpu_time_total > 0}
        total = sum(ops.values())
    groups: dict[str, float] = {}
    for name, ms in ops.items():
        group = UNATTRIBUTED if name == UNATTRIBUTED else profile_group(name)
        groups[group] = groups.get(group, 0.0) + ms
    top_ops = sorted(ops.items(), key=lambda item: -item[1])[:top]
    return {
        "total_ms": total or 1.0,
        "groups_ms": dict(sorted(groups.items(), key=lambda item: -item[1])),
        "top_ops_ms": dict(top_ops),
        "clock": "device" if on_device else "cpu",
    }


def print_profile(stage: str, profile: dict) -> None:
    total = profile["total_ms"]
    print(f"  {stage}: {total:.1f} ms of {profile['clock']} self time")
    for group, ms in profile["groups_ms"].items():
        print(f"    {group:<40}{ms:>10.1f} ms {ms / total:>7.1%}")
    print("    top operators: " + ", ".join(f"{name} {ms / total:.1%}" for name, ms in profile["top_ops_ms"].items()))
