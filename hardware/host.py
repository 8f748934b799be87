"""The `host` profile: this machine's memory bandwidth and matmul throughput, measured in a few
seconds and cached, so that estimates can be set beside measurements taken here.

This module measures and describes; `profiles.get_profile("host")` validates the description like any
profile file. torch is imported only to measure, so a cached host profile costs no torch import.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

from shrink.storage import atomic_write_text, cache_dir

_REPEATS = 5
_CACHE_VERSION = 2


def host_profile_data(refresh: bool = False) -> dict[str, Any]:
    """This machine as a profile table (the schema of profiles/*.toml), from the cache unless `refresh`."""
    path = cache_dir("host") / f"{_fingerprint()}.json"
    if path.is_file() and not refresh:
        data = json.loads(path.read_text())
        if data.get("version") == _CACHE_VERSION:
            return _profile_data(data)
    data = {"version": _CACHE_VERSION, **measure()}
    atomic_write_text(path, json.dumps(data, indent=2))
    return _profile_data(data)


def _fingerprint() -> str:
    try:  # the installed torch's version, read without importing torch (a second on 2 cores)
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "no-torch"
    cpu = platform.processor() or platform.machine()
    return "-".join([platform.node(), cpu, str(os.cpu_count()), torch_version]).replace("/", "_").replace(" ", "_")


def _best_rate(work: float, fn: Callable[[], object], repeats: int = _REPEATS) -> float:
    """Best of `repeats` after a warm-up: a roofline ceiling is what the machine can reach, and on a
    shared machine the slower runs measure the neighbours, not the hardware (STREAM reports best too)."""
    fn()  # warm-up: page faults, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return work / min(times)


def measure() -> dict:
    """Read bandwidth (GB/s) and dense matmul throughput (TFLOPS/TOPS) per compute class."""
    import torch  # heavy: imported only when the host is measured, not when its cache is read

    threads = torch.get_num_threads()
    bandwidth = _read_bandwidth(torch)
    peaks: dict[str, float] = {}
    for cls, operands in _matmul_operands(torch).items():
        probe = _matmul_rate(operands(256), repeats=1)
        # A class slower than fp32 on a small probe has no native kernel here (fp16 on most x86
        # CPUs runs a scalar fallback): leave it to its upcast rather than time it at full size.
        if cls != "fp32" and probe < peaks["fp32"] / 4:
            continue
        peaks[cls] = _matmul_rate(operands(2048), repeats=_REPEATS)
    for cls in [c for c in peaks if c != "fp32"]:
        if peaks[cls] < peaks["fp32"]:
            del peaks[cls]
    capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "threads": threads,
        "bandwidth_GBps": round(bandwidth, 2),
        "capacity_GB": round(capacity, 1),
        "peak_tflops": {k: round(v, 4) for k, v in peaks.items() if v > 0},
        "cpu": platform.processor() or platform.machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _read_bandwidth(torch) -> float:
    """GB/s reading 512 MiB of float32, far beyond any cache (freed when this returns)."""
    big = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    return _best_rate(big.numel() * 4, lambda: big.sum()) / 1e9


def _matmul_operands(torch) -> dict[str, Callable[[int], tuple]]:
    def floats(dtype):
        return lambda n: (torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype), torch.matmul)

    def ints(n):
        a, b = (torch.randint(-128, 127, (n, n), dtype=torch.int8) for _ in range(2))
        return a, b, torch._int_mm  # int8 x int8 -> int32 GEMM

    return {"fp32": floats(torch.float32), "bf16": floats(torch.bfloat16), "fp16": floats(torch.float16), "int8": ints}


def _matmul_rate(operands: tuple, repeats: int) -> float:
    a, b, matmul = operands
    n = a.shape[0]
    try:
        return _best_rate(2 * n**3, lambda: matmul(a, b), repeats) / 1e12
    except RuntimeError:  # no kernel for this dtype on this CPU in this torch build
        return 0.0


def _profile_data(data: dict) -> dict[str, Any]:
    return {
        "name": "host",
        "title": f"This machine ({os.cpu_count()} CPUs, measured with {data['threads']} threads)",
        "kind": "cpu",
        "runtimes": ["llama.cpp", "onnxruntime"],
        "memory": {
            "bandwidth_GBps": data["bandwidth_GBps"],
            "capacity_GB": data["capacity_GB"],
            "source": f"measured {data['measured_at']}: torch sum over 512 MiB of float32 (read-only), "
            f"best of {_REPEATS}",
        },
        "compute": {
            **data["peak_tflops"],
            "source": f"measured {data['measured_at']}: torch 2048x2048 matmul per dtype (torch._int_mm for int8), "
            f"best of {_REPEATS}",
        },
        "efficiency": {
            "bandwidth": 1.0,
            "compute": 1.0,
            "reasoning": "Measured throughputs are already achievable figures, so both efficiencies are 1.0. "
            "Runtimes' own kernels (llama.cpp's quantized dot products) may be faster or slower than torch's: "
            "benchmarks/estimate_vs_measured.py shows the gap.",
        },
    }
