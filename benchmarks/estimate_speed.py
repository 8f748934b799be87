"""How long a roofline estimate takes from a config alone, and how much memory it allocates.

    python benchmarks/estimate_speed.py [--model llama-3.1-405b] [--target h100-sxm] [--repeats 5]

Prints the median wall time of reading the config into an ArchSpec and of estimating prefill plus
every decode step, and the peak memory Python allocated for the estimate (weights are never made).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.1-405b")
    parser.add_argument("--target", default="h100-sxm")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    load_spec(args.model)  # first call pays for importing transformers (and torch under it)
    first_load = time.perf_counter() - start
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
    print(f"{args.model}: {counts.total:,} parameters, {spec.num_layers} layers; target {profile.name}; "
          f"prompt {args.prompt_len}, generate {args.gen_len}")
    print(f"measured: first config load {first_load:.2f} s (imports included), "
          f"config -> ArchSpec median {statistics.median(loads) * 1e3:.1f} ms, "
          f"estimate median {statistics.median(estimates) * 1e3:.1f} ms over {args.repeats} runs, "
          f"peak Python allocation during an estimate {peak / 2**20:.1f} MiB")
    print(f"estimated: TTFT {result.ttft_s * 1e3:.1f} ms, {result.tpot_s * 1e3:.2f} ms per token, "
          f"weights {result.memory.weights_bytes / 1e9:.1f} GB (fits: {result.memory.fits})")


if __name__ == "__main__":
    main()
