"""Every export format of the embedded model side by side: size on disk, verify metrics, decode speed.

    python benchmarks/export_formats.py [--out DIR] [--threads 2] [--formats gguf:f16,gguf:q8_0,...]

Each artifact is exported with `shrink export` semantics (verified against the PyTorch model on the
built-in varied text), then benched in its runtime (prompt 128, 32 decoded tokens, 3 runs after a
warm-up). All figures are measured on this machine except the last column, the host estimate.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shrink.export.bench import bench
from shrink.export.workflow import export_artifact
from shrink.model import load

DEFAULT = "gguf:f16,gguf:q8_0,gguf:q4_0,onnx:f32,onnx:int4"


def size_on_disk(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"]
    return sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="keep the artifacts here (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default=DEFAULT)
    args = parser.parse_args()
    console = Console(width=140)
    out = args.out or Path(tempfile.mkdtemp(prefix="shrink-formats-"))
    loaded = load("gemma-3-270m")
    table = Table(title="gemma-3-270m exported: measured here (2 CPU cores) unless marked estimated", title_justify="left")
    for column in ("format", "size on disk", "positions", "top-1 agreement", "mean KL", "max |Δlogit|", "ppl (ref 15.27)",
                   "verify", "decode ms/token (median)", "decode tok/s", "estimated ms/token (host)"):
        table.add_column(column, justify="left" if column in ("format", "verify") else "right")
    for item in args.formats.split(","):
        fmt, quant = item.split(":")
        path = out / (f"gemma-{quant}.gguf" if fmt == "gguf" else f"gemma-onnx-{quant}")
        console.print(f"exporting {item} to {path}")
        result = export_artifact(loaded, fmt, path, quant=quant)
        timing = bench(path, threads=args.threads, prompt_len=128, gen_len=32, repeats=3)
        m = result.verdict.metrics
        table.add_row(item, f"{size_on_disk(path) / 1e6:.1f} MB", str(m.positions), f"{m.top1_agreement:.2%}",
                      f"{m.mean_kl:.4f}", f"{m.max_abs_logit_diff:.3f}", f"{m.ppl_artifact:.2f}",
                      "pass" if result.verdict.passed else "FAIL", f"{timing.decode.median_s * 1e3:.2f}",
                      f"{1 / timing.decode.median_s:.1f}", f"{timing.estimate.tpot_s * 1e3:.2f}")
    console.print(table)
    console.print(f"artifacts in {out}")


if __name__ == "__main__":
    main()
