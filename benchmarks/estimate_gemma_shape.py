"""Where the host estimate of the embedded Gemma's decode goes wrong: a random Llama with Gemma 3 270M's
shapes beside the real model, each estimated (roofline on `host`, llama.cpp's kernels as calibrated here)
and measured in llama.cpp.

The synthetic model has Gemma 3 270M's widths (hidden 640, FFN 2048, 4 query heads and 1 KV head of 256,
a tied vocabulary of 262,144) with Llama's layer (two norms, SiLU, no q/k norms, no sliding window), so
an error it shares with the real model lies in the widths and the vocabulary, and an error only the real
model has lies in Gemma's own layer. The real artifacts are the F16 and Q8_0 files that
benchmarks/estimate_vs_measured.py wrote into its --work directory. Every time is the median of
--repeats runs after a warm-up, as `shrink bench` times; run on a quiet machine after
`shrink profiles calibrate` (the host cache).

    python benchmarks/estimate_gemma_shape.py [--layers 18] [--vocab 262144] [--real DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from shrink.allocator import map_large_allocations
from shrink.export.bench import bench
from shrink.export.manifest import write_manifest
from shrink.flows.calibrate import synthetic_model, write_gguf
from shrink.hardware.profiles import get_profile

FORMATS = ("fp16", "q8_0")
GEMMA_WIDTHS = {"hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 256}


def synthetic(layers: int, vocab: int):
    return synthetic_model(GEMMA_WIDTHS, layers, vocab, tied=True)


def row(label: str, path: Path, args, host) -> None:
    result = bench(path, prompt_len=128, gen_len=32, repeats=args.repeats, host=host)
    decode, estimate = result.decode.median_s, result.estimate.tpot_s
    print(f"{label:34s} decode {decode * 1e3:7.2f} ms measured, {estimate * 1e3:7.2f} ms estimated "
          f"({estimate / decode - 1:+.1%}); prefill of 128 {result.prefill.median_s * 1e3:6.1f} ms measured, "
          f"{result.estimate.ttft_s * 1e3:6.1f} ms estimated", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--real", type=Path, default=None, help="estimate_vs_measured.py's --work directory")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    map_large_allocations()  # as the shrink command does
    host = get_profile("host")
    kernels = host.calibration("llama.cpp")
    print("llama.cpp kernels: " + (kernels.source if kernels else "NOT calibrated: run shrink profiles calibrate first"))
    loaded = synthetic(args.layers, args.vocab)
    with tempfile.TemporaryDirectory(prefix="estimate-gemma-shape-") as tmp:
        f16 = write_gguf(loaded, "fp16", Path(tmp), None)
        for fmt in FORMATS:
            path = f16 if fmt == "fp16" else write_gguf(loaded, fmt, Path(tmp), f16)
            # what bench reads the architecture from (the stored formats it reads from the file)
            write_manifest(path, source=loaded.source, source_hash="random", spec=loaded.spec,
                           export={"quant": fmt}, verify=None)
            row(f"Llama, Gemma's widths, {fmt}", path, args, host)
    for fmt in FORMATS if args.real else ():
        row(f"Gemma 3 270M, {fmt}", args.real / f"{fmt}.gguf", args, host)


if __name__ == "__main__":
    main()
