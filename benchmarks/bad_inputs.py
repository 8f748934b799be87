"""A battery of bad inputs a user can give, across every command: counts tracebacks, zero exit codes
and half-written outputs (all three must be 0), and prints each case's first error line.

    python benchmarks/bad_inputs.py [--only SUBSTRING]

Every case runs `python -m shrink ...` as a separate process in a scratch directory; files a case
needs (a truncated GGUF, malformed TOML and JSON, random bytes) are written there first. The embedded
model is used where a real model is needed (assembled into the shrink cache on first use).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def files(root: Path) -> dict[str, Path]:
    """The malformed inputs, written once."""
    from shrink.model import embedded_gguf_path

    made = {}

    def write(name: str, data: bytes | str) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        made[name] = path

    write("random.gguf", os.urandom(4096))
    write("truncated.gguf", embedded_gguf_path().read_bytes()[:200_000])
    write("bad.toml", "name = \n[memory\n")
    write("nokey.toml", 'name = "x"\ntitle = "x"\nkind = "cpu"\nruntimes = ["llama.cpp"]\n')
    write("unknown-step.toml", '[[step]]\nname = "distil"\n')
    write("bad-key.toml", '[[step]]\nname = "prune"\nparms = 0.5\n')
    write("notjson/config.json", "{ not json")
    write("notype/config.json", '{"hidden_size": 8}')
    write("bert/config.json", '{"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1}')
    write("empty/config.json", "")
    write("spec.json", '{"family": "llama", "vocab_size": 8, "hidden_size": 8, "tied_embeddings": false, '
                       '"layers": [], "colour": "red"}')
    write("manifest.json", "{ truncated")
    write("words.txt", "")
    write("latin1.txt", "caf\xe9 au lait\n\nun autre document".encode("latin-1"))
    made["nan-model"] = _damaged_model(root / "nan-model")
    return made


def _damaged_model(path: Path) -> Path:
    """A tiny random Llama saved with one NaN weight (a diverged training's output)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shrink.model import save

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    return save(model, path)


def cases(f: dict[str, Path], out: Path) -> list[tuple[str, list[str], Path | None]]:
    """(what, arguments, an output that must not exist afterwards or None)."""
    g = "gemma-3-270m"
    return [
        ("unknown model", ["estimate", "no-such-model"], None),
        ("unknown target", ["estimate", g, "-t", "no-such-board"], None),
        ("unknown weight format", ["estimate", g, "--weights", "int3"], None),
        ("zero batch", ["estimate", g, "--batch", "0"], None),
        ("config that is not JSON", ["estimate", str(f["notjson/config.json"].parent)], None),
        ("config without model_type", ["estimate", str(f["notype/config.json"].parent)], None),
        ("unsupported architecture", ["estimate", str(f["bert/config.json"].parent)], None),
        ("empty config", ["inspect", str(f["empty/config.json"].parent)], None),
        ("ArchSpec JSON with an unknown key", ["inspect", str(f["spec.json"])], None),
        ("missing GGUF", ["inspect", str(out / "missing.gguf")], None),
        ("GGUF of random bytes", ["inspect", str(f["random.gguf"])], None),
        ("truncated GGUF", ["inspect", str(f["truncated.gguf"])], None),
        ("unknown profile", ["profiles", "show", "no-such-board"], None),
        ("malformed profile TOML", ["profiles", "show", str(f["bad.toml"])], None),
        ("profile missing keys", ["profiles", "show", str(f["nokey.toml"])], None),
        ("estimate on a malformed profile", ["estimate", g, "-t", str(f["bad.toml"])], None),
        ("unknown export format", ["export", g, "-f", "tflite", "-o", str(out / "e1")], out / "e1"),
        ("unknown GGUF type", ["export", g, "-f", "gguf", "--quant", "q3_x", "-o", str(out / "e2.gguf")], out / "e2.gguf"),
        ("odd ONNX block size", ["export", g, "-f", "onnx", "--quant", "int4", "--block-size", "7", "-o",
                                 str(out / "e3")], out / "e3"),
        ("export of a missing model", ["export", str(out / "nothing"), "-f", "gguf", "-o", str(out / "e4.gguf")],
         out / "e4.gguf"),
        ("verify a missing artifact", ["verify", str(out / "missing.gguf")], None),
        ("verify random bytes", ["verify", str(f["random.gguf"]), "--reference", g], None),
        ("verify against a corrupt baseline", ["verify", str(f["truncated.gguf"]), "--reference", g, "--baseline",
                                               str(f["manifest.json"])], None),
        ("bench a missing artifact", ["bench", str(out / "missing.gguf")], None),
        ("bench a truncated GGUF", ["bench", str(f["truncated.gguf"])], None),
        ("bench zero repeats", ["bench", str(f["truncated.gguf"]), "--repeats", "0"], None),
        ("generate from random bytes", ["generate", str(f["random.gguf"]), "--prompt", "hello"], None),
        ("run with neither recipe nor budget", ["run", g, "-o", str(out / "r1")], out / "r1"),
        ("run a missing recipe", ["run", g, "--recipe", str(out / "none.toml"), "-o", str(out / "r2")], out / "r2"),
        ("run a malformed recipe", ["run", g, "--recipe", str(f["bad.toml"]), "-o", str(out / "r3")], out / "r3"),
        ("run a recipe with an unknown step", ["run", g, "--recipe", str(f["unknown-step.toml"]), "-o",
                                               str(out / "r4")], out / "r4"),
        ("run a recipe with an unknown key", ["run", g, "--recipe", str(f["bad-key.toml"]), "-o", str(out / "r5")],
         out / "r5"),
        ("impossible budget", ["run", g, "--target", "jetson-orin-nano", "--budget", "0.01ms", "-o", str(out / "r6")],
         out / "r6"),
        ("budget without a unit", ["run", g, "--target", "jetson-orin-nano", "--budget", "20", "-o", str(out / "r7")],
         out / "r7"),
        ("malformed workload", ["run", g, "--target", "jetson-orin-nano", "--budget", "20ms", "--workload",
                                "batch=x", "-o", str(out / "r8")], out / "r8"),
        ("resume with nothing to resume", ["run", g, "--resume", "-o", str(out / "r9")], out / "r9"),
        ("unknown quantization format", ["quantize", g, "--format", "int3", "-o", str(out / "q1")], out / "q1"),
        ("unknown quantization runtime", ["quantize", g, "--format", "int4", "--runtime", "tflite", "-o",
                                          str(out / "q2")], out / "q2"),
        ("QAD and PTQ-only together", ["quantize", g, "--format", "int4", "--qad", "--ptq-only", "-o",
                                       str(out / "q3")], out / "q3"),
        ("prune to more than the model", ["prune", g, "--params", "1.5", "-o", str(out / "p1")], out / "p1"),
        ("prune on an unknown axis", ["prune", g, "--params", "0.5", "--axis", "diagonal", "-o", str(out / "p2")],
         out / "p2"),
        ("distill from a missing teacher", ["distill", g, "--teacher", str(out / "nothing"), "-o", str(out / "d1")],
         out / "d1"),
        ("distill on a missing data file", ["distill", g, "--teacher", g, "--data", str(out / "none.txt"), "-o",
                                              str(out / "d2")],
         out / "d2"),
        ("export a model with a NaN weight", ["export", str(f["nan-model"]), "-f", "onnx", "-o", str(out / "e5")],
         out / "e5"),
        ("quantize a model with a NaN weight", ["quantize", str(f["nan-model"]), "--format", "int8", "-o",
                                                str(out / "q4")], out / "q4"),
        ("distill on a data file that is not UTF-8", ["distill", g, "--teacher", g, "--data", str(f["latin1.txt"]),
                                                      "-o", str(out / "d4")], out / "d4"),
        ("distill on an empty data file", ["distill", g, "--teacher", g, "--data", str(f["words.txt"]), "-o",
                                            str(out / "d3")],
         out / "d3"),
    ]


def run_case(argv: list[str], output: Path | None, cwd: Path, in_process: bool = False) -> dict:
    """One case: its exit code, whether a traceback escaped, whether `output` was left behind, its text.
    A separate `python -m shrink` process, or (in_process, for the test suite) typer's CliRunner, where
    an exception that escapes the command is the traceback."""
    start = time.perf_counter()
    if in_process:
        from typer.testing import CliRunner

        from shrink.cli.app import app

        result = CliRunner().invoke(app, argv)
        code, text = result.exit_code, result.output
        traceback = result.exception is not None and not isinstance(result.exception, SystemExit)
        if traceback:
            text += f"\nTraceback (most recent call last): {type(result.exception).__name__}: {result.exception}"
    else:
        done = subprocess.run([sys.executable, "-m", "shrink", *argv], capture_output=True, text=True, cwd=cwd,
                              timeout=600)
        code, text = done.returncode, done.stdout + done.stderr
        traceback = "Traceback (most recent call last)" in text
    return {"exit": code, "seconds": time.perf_counter() - start, "traceback": traceback,
            "half_written": output is not None and output.exists(), "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="Run only the cases whose description contains this.")
    args = parser.parse_args()
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="shrink-bad-") as scratch:
        root = Path(scratch)
        made = files(root / "in")
        table = Table(title="Bad inputs (measured: each a separate `python -m shrink` process)", title_justify="left")
        for column in ("case", "exit", "s", "traceback", "half-written", "first error line"):
            table.add_column(column, overflow="fold")
        tracebacks = zero = half = 0
        selected = [c for c in cases(made, root / "out") if args.only in c[0]]
        for what, argv, output in selected:
            case = run_case(argv, output, root)
            tracebacks += case["traceback"]
            zero += case["exit"] == 0
            half += case["half_written"]
            first = next((line for line in case["text"].splitlines() if line.startswith("error")),
                         case["text"].strip()[-120:])
            table.add_row(what, str(case["exit"]), f"{case['seconds']:.1f}", "YES" if case["traceback"] else "",
                          "YES" if case["half_written"] else "", first[:150])
        console.print(table)
        console.print(f"{len(selected)} bad inputs: {tracebacks} tracebacks, {zero} zero exit codes, "
                      f"{half} half-written outputs (measured)")
        sys.exit(1 if tracebacks or zero or half else 0)


if __name__ == "__main__":
    main()
