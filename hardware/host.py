"""The `host` profile: this machine's memory bandwidth and matmul throughput, measured in a few
seconds and cached, so that estimates can be set beside measurements taken here.

This module measures and describes; `profiles.get_profile("host")` validates the description like any
profile file. torch is imported only to measure, so a cached host profile costs no torch import.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from shrink.storage import atomic_write_text, cache_dir

_REPEATS = 5
_AGREE = 0.05  # the two fastest runs of a measurement agree within this, or it repeats
_MAX_REPEATS = 15
_CACHE_VERSION = 5  # 3: busy measurements flagged; 4: spreads recorded; 5: a quick probe recorded
_DRIFT = 0.15  # the quick probe this far from its cached figure: the cache describes another state of the machine
_KERNELS_VERSION = 2  # 2: short rows timed under a real model's vocabulary (flows/calibrate.SHORT_VOCAB)


def host_profile_data(refresh: bool = False) -> dict[str, Any]:
    """This machine as a profile table (the schema of profiles/*.toml), from the cache unless `refresh`,
    with the runtimes' kernels where `shrink profiles calibrate` has measured them. A measurement taken
    while the machine was busy is used once and not cached."""
    path = cache_dir("host") / f"{fingerprint()}.json"
    data = None
    if path.is_file() and not refresh:
        data = json.loads(path.read_text())
        if data.get("version") != _CACHE_VERSION:
            data = None
    drift = None
    if data is None:
        data = {"version": _CACHE_VERSION, **measure()}
        if not data["busy"]:
            atomic_write_text(path, json.dumps(data, indent=2))
    else:
        drift = _drift(data.get("probe_GBps"), f"`host` was measured ({data['measured_at']})")
    profile = _profile_data(data, drift)
    kernels = kernels_cache_path()
    if kernels.is_file():
        runtimes = json.loads(kernels.read_text())
        stale = _drift(runtimes.pop(KERNELS_PROBE, None), "its runtimes' kernels were calibrated")
        for table in runtimes.values():
            table["source"] += f"; STALE: {stale}" if stale else ""
        profile["runtime"] = runtimes
    return profile


KERNELS_PROBE = "probe_GBps"  # the kernels cache's one key that is not a runtime: the probe when they were measured


def kernels_cache_text(runtimes: dict[str, dict]) -> str:
    """The kernels cache file: each runtime's table and the quick probe taken now, to tell later readers
    whether the machine still runs at the speed they were measured at."""
    return json.dumps({**runtimes, KERNELS_PROBE: round(_probe_GBps(), 2)}, indent=2)


def _drift(cached: float | None, when: str) -> str | None:
    """A sentence when this machine now runs the quick probe at another speed than `cached`, its rate when
    the cached figures were measured (a virtual machine moved to other hardware, or neighbours outside it
    are busy: the host name and CPU model stay the same while the speed moves by a third or more); None
    when it does not, or the cache holds no probe. Said once per process, as a warning, and kept in the
    source of the figures it concerns."""
    if not cached:
        return None
    now = _probe_GBps()
    if abs(now / cached - 1) <= _DRIFT:
        return None
    sentence = (f"this machine runs a quick probe (numpy summing 32 MiB on one core) at {now:.1f} GB/s now against "
                f"{cached:.1f} GB/s when {when}: the cached measurements, the "
                "calibrated kernels included, describe another state of this machine; run `shrink profiles calibrate` "
                "to measure again")
    _warn_once(sentence)
    return sentence


_warned: set[str] = set()


def _warn_once(sentence: str) -> None:
    if sentence not in _warned:
        _warned.add(sentence)
        logging.getLogger(__name__).warning(sentence)


@functools.cache
def _probe_GBps() -> float:
    """How fast one core sums 32 MiB of float32 (GB/s, fastest of 3): about 0.15 s with no torch import,
    recorded beside each measurement and taken again, once per process, when the cache is read. It follows
    the core's speed more than the memory's (the rate did not change from 32 to 512 MiB here)."""
    import numpy as np

    block = np.ones(8 * 1024 * 1024, np.float32)
    fastest = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        block.sum()
        fastest = min(fastest, time.perf_counter() - start)
    return block.nbytes / fastest / 1e9


def kernels_cache_path() -> Path:
    """Where this machine's runtime kernels, as calibrated, are cached (`shrink profiles calibrate`)."""
    return cache_dir("host") / f"kernels-v{_KERNELS_VERSION}-{fingerprint()}.json"


def fingerprint() -> str:
    """This machine and the software that runs models on it: a cached measurement of another CPU, or of
    another torch, llama.cpp or ONNX Runtime, is not this one's (versions read without importing them)."""
    parts = [platform.node(), platform.processor() or platform.machine(), str(os.cpu_count())]
    parts += [package_version(package) or f"no-{package}" for package in ("torch", "llama-cpp-python", "onnxruntime")]
    return "-".join(parts).replace("/", "_").replace(" ", "_")


def package_version(package: str) -> str | None:
    """An installed distribution's version, read from its metadata (no import); None when absent."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


BUSY_SHARE = 0.25  # other processes using more of the CPUs than this make a measurement untrustworthy


def others_busy_share(window_s: float = 0.5) -> float:
    """The share of all CPUs that other processes kept busy over `window_s` while this one slept, from
    /proc/stat (0.0 where there is none). A timing taken beside them measures the neighbours too. (The
    load average cannot tell: it counts this process, and lags a minute.)"""
    def busy_ticks() -> int | None:
        try:
            with open("/proc/stat") as stat:
                values = [int(v) for v in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        return sum(values) - values[3] - values[4]  # all but idle and iowait

    start, started = busy_ticks(), time.perf_counter()
    if start is None:
        return 0.0
    time.sleep(window_s)
    end, elapsed = busy_ticks(), time.perf_counter() - started
    return max(0.0, (end - start) / os.sysconf("SC_CLK_TCK") / (elapsed * (os.cpu_count() or 1)))


def _stable_rate(work: float, fn: Callable[[], object], repeats: int = _REPEATS) -> tuple[float, float]:
    """(rate of the fastest run, spread) after a warm-up: at least `repeats` runs (and two), more until
    the two fastest agree within _AGREE (at most _MAX_REPEATS); spread = second fastest / fastest - 1.
    The fastest, because a roofline ceiling is what the machine can reach, and on a shared machine the
    slower runs measure the neighbours, not the hardware (STREAM reports best too); the spread says
    whether that ceiling was reached twice."""
    fn()  # warm-up: page faults, kernel selection
    times: list[float] = []
    while True:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= max(repeats, 2):
            fastest, second = sorted(times)[:2]
            spread = second / fastest - 1
            if spread <= _AGREE or len(times) >= _MAX_REPEATS:
                return work / fastest, spread


def measure() -> dict:
    """Read bandwidth (GB/s) and dense matmul throughput (TFLOPS/TOPS) per compute class."""
    import torch  # heavy: imported only when the host is measured, not when its cache is read

    threads = torch.get_num_threads()
    others = others_busy_share()
    bandwidth, spreads = _read_bandwidth(torch), {}
    spreads["bandwidth"] = bandwidth[1]
    peaks: dict[str, float] = {}
    for cls, operands in _matmul_operands(torch).items():
        probe, _ = _matmul_rate(operands(256), repeats=1)
        # A class slower than fp32 on a small probe has no native kernel here (fp16 on most x86
        # CPUs runs a scalar fallback): leave it to its upcast rather than time it at full size.
        if cls != "fp32" and probe < peaks["fp32"] / 4:
            continue
        peaks[cls], spreads[cls] = _matmul_rate(operands(2048), repeats=_REPEATS)
    for cls in [c for c in peaks if c != "fp32"]:
        if peaks[cls] < peaks["fp32"]:
            del peaks[cls], spreads[cls]
    capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "threads": threads,
        "bandwidth_GBps": round(bandwidth[0], 2),
        "spreads": {k: round(v, 4) for k, v in spreads.items()},
        "capacity_GB": round(capacity, 1),
        "peak_tflops": {k: round(v, 4) for k, v in peaks.items() if v > 0},
        "cpu": platform.processor() or platform.machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "probe_GBps": round(_probe_GBps(), 2),
        "busy": others > BUSY_SHARE,
        "others_busy_share": round(others, 3),
    }


def _read_bandwidth(torch) -> tuple[float, float]:
    """(GB/s, spread) reading 512 MiB of float32, far beyond any cache (freed when this returns)."""
    big = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    rate, spread = _stable_rate(big.numel() * 4, lambda: big.sum())
    return rate / 1e9, spread


def _matmul_operands(torch) -> dict[str, Callable[[int], tuple]]:
    def floats(dtype):
        return lambda n: (torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype), torch.matmul)

    def ints(n):
        a, b = (torch.randint(-128, 127, (n, n), dtype=torch.int8) for _ in range(2))
        return a, b, torch._int_mm  # int8 x int8 -> int32 GEMM

    return {"fp32": floats(torch.float32), "bf16": floats(torch.bfloat16), "fp16": floats(torch.float16), "int8": ints}


def _matmul_rate(operands: tuple, repeats: int) -> tuple[float, float]:
    """(TFLOPS or TOPS, spread)."""
    a, b, matmul = operands
    n = a.shape[0]
    try:
        rate, spread = _stable_rate(2 * n**3, lambda: matmul(a, b), repeats)
        return rate / 1e12, spread
    except RuntimeError:  # no kernel for this dtype on this CPU in this torch build
        return 0.0, 0.0


def _repeats(spreads: dict[str, float], names: list[str]) -> str:
    """How a measurement was repeated and how far its two fastest runs were apart."""
    how = f"fastest of at least {_REPEATS} runs, repeated until the two fastest agree within {_AGREE:.0%}"
    known = [spreads[name] for name in names if name in spreads]
    return how + (f" (largest spread {max(known):.1%})" if known else "")


def _profile_data(data: dict, drift: str | None = None) -> dict[str, Any]:
    spreads = data.get("spreads", {})
    return {
        "name": "host",
        "title": f"This machine ({os.cpu_count()} CPUs, measured with {data['threads']} threads)",
        "kind": "cpu",
        "runtimes": ["llama.cpp", "onnxruntime"],
        "memory": {
            "bandwidth_GBps": data["bandwidth_GBps"],
            "capacity_GB": data["capacity_GB"],
            "source": f"measured {data['measured_at']}: torch sum over 512 MiB of float32 (read-only), "
            + _repeats(spreads, ["bandwidth"])
            + (f"; BUSY: other processes used {data['others_busy_share']:.0%} of the CPUs, not cached"
               if data.get("busy") else "")
            + (f"; STALE: {drift}" if drift else ""),
        },
        "compute": {
            **data["peak_tflops"],
            "source": f"measured {data['measured_at']}: torch 2048x2048 matmul per dtype (torch._int_mm for int8), "
            + _repeats(spreads, list(data["peak_tflops"])),
        },
        "efficiency": {
            "bandwidth": 1.0,
            "compute": 1.0,
            "reasoning": "Measured throughputs are already achievable figures, so both efficiencies are 1.0. "
            "Runtimes' own kernels (llama.cpp's quantized dot products) are slower or faster than torch's, each "
            "format by its own amount: `shrink profiles calibrate` measures them, and estimates use them when cached.",
        },
    }
