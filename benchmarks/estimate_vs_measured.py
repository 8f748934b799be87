"""Estimated (roofline, `host` profile) beside measured (llama.cpp) for the embedded model here.

Runs the original Q4_K_M GGUF of the embedded Gemma 3 270M in llama-cpp-python with the timing
loop of `shrink bench` (seeded token ids, one warm-up run), times prefill and every decode step,
and prints them next to `shrink estimate` for the same workload and the formats the file really
stores. The ratio is the host profile's error.

    python benchmarks/estimate_vs_measured.py [--threads 2] [--prompt-len 256] [--gen-len 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics

from rich.console import Console
from rich.table import Table

from shrink.export.backend import backend
from shrink.export.bench import token_ids
from shrink.ggufmeta import gguf_formats
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import embedded_gguf_path, load_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=120)

    path = embedded_gguf_path()
    stored = gguf_formats(path)
    spec = load_spec("gemma-3-270m")
    spec = spec.with_formats(**{k: v for k, v in vars(stored.formats).items() if k != "ssm_state"})
    profile = get_profile("host")
    est = estimate(spec, profile, Workload(batch=1, prompt_len=args.prompt_len, gen_len=args.gen_len))

    prompt, gen = token_ids(args.prompt_len, spec.vocab_size), token_ids(args.gen_len, spec.vocab_size)
    prefill, decode = backend("gguf").time(path, args.threads, prompt, gen, args.repeats)
    prefill_med, decode_med = statistics.median(prefill), statistics.median(decode)
    q1, _, q3 = statistics.quantiles(decode, n=4)

    console.print(f"[bold]{path.name}[/] on this machine: llama-cpp-python, {args.threads} threads, "
                  f"prompt {args.prompt_len}, generate {args.gen_len}, {args.repeats} runs after a warm-up")
    console.print(f"stored formats: {stored.linear_bytes_by_type} in block weights, costed as weights "
                  f"{spec.formats.weights}, embeddings {spec.formats.embeddings}; host profile: "
                  f"{profile.bandwidth_GBps:g} GB/s, peaks {profile.peak_tflops} TFLOPS/TOPS")
    table = Table()
    for column in ("figure", "measured (llama.cpp)", "estimated (roofline, host)", "measured / estimated"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    table.add_row("prefill time", f"{prefill_med * 1e3:.1f} ms (min {min(prefill) * 1e3:.1f}, max {max(prefill) * 1e3:.1f})",
                  f"{est.ttft_s * 1e3:.1f} ms ({est.prefill.bound}-bound)", f"{prefill_med / est.ttft_s:.2f}x")
    table.add_row("decode time per token", f"{decode_med * 1e3:.2f} ms (IQR {q1 * 1e3:.2f}-{q3 * 1e3:.2f})",
                  f"{est.tpot_s * 1e3:.2f} ms ({est.decode.bound}-bound)", f"{decode_med / est.tpot_s:.2f}x")
    table.add_row("decode tokens/s", f"{1 / decode_med:.1f}", f"{est.decode_tokens_per_s:.1f}",
                  f"{est.tpot_s / decode_med:.2f}x")
    table.add_row("bytes read per decode step", "-", f"{est.decode.bytes / 1e6:.1f} MB", "")
    console.print(table)
    achieved = est.decode.bytes / decode_med / 1e9
    console.print(f"llama.cpp moves the estimated decode bytes at an effective {achieved:.1f} GB/s "
                  f"({achieved / profile.bandwidth_GBps:.0%} of the measured host bandwidth).")


if __name__ == "__main__":
    main()
