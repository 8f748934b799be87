"""How long a roofline estimate takes from a config alone: the command as a whole, its imports, and
the estimate itself, with the memory it allocates.

    python benchmarks/estimate_speed.py [--model llama-3.1-405b] [--target h100-sxm] [--repeats 5]

Prints medians over `--repeats` runs of:
- the whole process `shrink estimate MODEL -t TARGET` with the command's defaults (run as
  `python -m shrink`, output discarded): wall and CPU time, beside a bare `python -c pass` for the
  interpreter's own start, with the load average (wall time on a shared machine grows with it);
- the time that command spends importing modules, and the part of it spent importing torch and
  transformers (with everything they import), read from `python -X importtime`;
- in this process, for --prompt-len and --gen-len: config -> ArchSpec, the estimate of prefill plus
  every decode step, and the peak memory Python allocated for one estimate (weights are never made).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load_spec

HEAVY = ("torch", "transformers")


def _import_seconds(command: list[str]) -> tuple[float, float]:
    """(all imports, torch and transformers with what they import) in one run of `command`, read from
    `python -X importtime`: its lines are `self us | cumulative us | name`, children before their
    parent, two more spaces of indent per level."""
    out = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, check=True)
    entries = []
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            entries.append((len(name) - len(name.lstrip()), name.strip(), int(cumulative)))
    total = sum(us for depth, _, us in entries if depth == 1)
    heavy, enclosing = 0, []  # walked parent-first; `enclosing` holds (depth, is heavy) of the open parents
    for depth, name, us in reversed(entries):
        while enclosing and enclosing[-1][0] >= depth:
            enclosing.pop()
        is_heavy = name.split(".")[0] in HEAVY
        if is_heavy and not any(h for _, h in enclosing):
            heavy += us
        enclosing.append((depth, is_heavy))
    return total / 1e6, heavy / 1e6


def _median_run(command: list[str], repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of `command`, medians; CPU time (user + system) moves far less than wall
    time when other processes share the cores."""
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-405b")
    parser.add_argument("--target", default="h100-sxm")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    command = [sys.executable, "-m", "shrink", "estimate", args.model, "-t", args.target]  # its own defaults
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)  # warm-up: .pyc files, file cache
    whole, whole_cpu = _median_run(command, args.repeats)
    bare, _ = _median_run([sys.executable, "-c", "pass"], args.repeats)
    imports = [_import_seconds(command) for _ in range(args.repeats)]
    all_imports = statistics.median(total for total, _ in imports)
    heavy = statistics.median(heavy for _, heavy in imports)

    profile = get_profile(args.target)
    workload = Workload(batch=1, prompt_len=args.prompt_len, gen_len=args.gen_len)
    loads, estimates = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        spec = load_spec(args.model)
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = estimate(spec, profile, workload)
        estimates.append(time.perf_counter() - start)
    tracemalloc.start()
    estimate(spec, profile, workload)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    counts = spec.param_counts()
    print(f"{args.model}: {counts.total:,} parameters, {spec.num_layers} layers; target {profile.name}")
    print(f"measured (median of {args.repeats}): `shrink estimate {args.model} -t {args.target}` as a whole "
          f"process {whole:.2f} s wall, {whole_cpu:.2f} s CPU (a bare `python -c pass` {bare:.2f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); of it, imports {all_imports:.2f} s, "
          f"of which torch and transformers {heavy:.2f} s (read with -X importtime, which adds its own overhead)")
    print(f"measured (median of {args.repeats}) for prompt {args.prompt_len}, generate {args.gen_len}: "
          f"config -> ArchSpec {statistics.median(loads) * 1e3:.1f} ms, "
          f"estimate {statistics.median(estimates) * 1e3:.1f} ms, "
          f"peak Python allocation during an estimate {peak / 2**20:.1f} MiB")
    print(f"estimated: TTFT {result.ttft_s * 1e3:.1f} ms, {result.tpot_s * 1e3:.2f} ms per token, "
          f"weights {result.memory.weights_bytes / 1e9:.1f} GB (fits: {result.memory.fits})")


if __name__ == "__main__":
    main()
