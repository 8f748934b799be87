"""Kill a `shrink run` anywhere, resume it, and check that the result is the uninterrupted run's, byte for byte.

    python benchmarks/kill_resume.py                 # every 3rd fault point the run passes (about 20)
    python benchmarks/kill_resume.py --points 3      # what the test suite runs

1. A tiny Llama with a byte-level BPE tokenizer trained here, and a text file (tests/tiny_models.py).
2. RECIPE run once without interruption, with $SHRINK_FAULT_TRACE: every fault point it passes (each
   step's start; every write of a cache, checkpoint, model, artifact, manifest and the run report, in
   the moment between the file being written in full and its rename into place; a checkpoint being
   replaced) and the sha256 of its final artifact.
3. For each chosen point: a fresh cache and run directory, the run killed there by SIGKILL
   ($SHRINK_KILL_AT), then the same command with --resume. Recorded: that the kill happened (exit
   -9), that the resume finished (exit 0), that the resumed artifact's sha256 equals the uninterrupted
   one, and the temporary files the kill left behind (never trusted: they are not the files' names).

Prints a table and a summary line (--json: the records); exits 1 when any resume fails or differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

RECIPE = """description = "kill-anywhere harness"

[[step]]
name = "prune"
params = 0.6

[[step]]
name = "distill"
tokens = 1024
lr = 1e-3

[[step]]
name = "export"
format = "gguf"
quant = "q8_0"

[[step]]
name = "verify"
"""


def make_workspace(root: Path) -> tuple[Path, Path, Path]:
    """The model directory, the text file and the recipe the harness runs."""
    from tiny_models import save_tiny_bpe_model

    model_dir, text = save_tiny_bpe_model(root)
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE)
    return model_dir, text, recipe


def shrink_run(workspace: tuple[Path, Path, Path], run_dir: Path, cache: Path, *, resume: bool = False,
               trace: Path | None = None, kill_at: str | None = None) -> int:
    model_dir, text, recipe = workspace
    env = {k: v for k, v in os.environ.items() if k not in ("SHRINK_FAULT_TRACE", "SHRINK_KILL_AT")}
    env["SHRINK_CACHE"] = str(cache)
    if trace is not None:
        env["SHRINK_FAULT_TRACE"] = str(trace)
    if kill_at is not None:
        env["SHRINK_KILL_AT"] = kill_at
    command = [sys.executable, "-m", "shrink", "run", str(model_dir), "--recipe", str(recipe), "-o", str(run_dir),
               "--data", str(text), "--seq-len", "32", "--json", *(["--resume"] if resume else [])]
    return subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def final_artifact(run_dir: Path) -> Path | None:
    report = json.loads((run_dir / "run.json").read_text())
    artifact = (report.get("final") or {}).get("artifact")
    return Path(artifact) if artifact else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(*folders: Path) -> list[str]:
    """Temporary files and directories a kill left (atomic writes name them .NAME.*.tmp or .NAME.old)."""
    return sorted(str(p.relative_to(folder)) for folder in folders if folder.exists() for p in folder.rglob(".*")
                  if p.name.endswith((".tmp", ".old")))


def choose(passages: list[str], count: int | None, every: int) -> list[str]:
    """Each kind of point once (a step's start, each file's write), then evenly spread passages."""
    firsts = list(dict.fromkeys(p for p in passages if p.endswith("#1")))
    spread = passages[::every]
    chosen = list(dict.fromkeys(firsts + spread))
    chosen.sort(key=passages.index)
    if count is not None and len(chosen) > count:
        step = len(chosen) / count
        chosen = [chosen[int(i * step)] for i in range(count)]
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=None, help="kill points tried (default: every kind once, and every 3rd passage)")
    parser.add_argument("--every", type=int, default=3, help="besides each kind's first passage, every Nth passage")
    parser.add_argument("--workdir", type=Path, default=None, help="where to work (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="shrink-kill-"))
    root.mkdir(parents=True, exist_ok=True)
    workspace = make_workspace(root)
    began = time.perf_counter()
    trace = root / "trace.txt"
    reference_dir = root / "reference"
    if shrink_run(workspace, reference_dir, root / "reference-cache", trace=trace) != 0:
        print(f"the uninterrupted run failed; see `shrink run` in {reference_dir}", file=sys.stderr)
        return 1
    passages = trace.read_text().split()
    expected = sha256(final_artifact(reference_dir))
    records = []
    for index, point in enumerate(choose(passages, args.points, args.every)):
        run_dir, cache = root / f"trial-{index:02d}", root / f"trial-{index:02d}-cache"
        killed = shrink_run(workspace, run_dir, cache, kill_at=point)
        left = leftovers(run_dir, cache)
        resumed = shrink_run(workspace, run_dir, cache, resume=True)
        artifact = final_artifact(run_dir) if resumed == 0 else None
        same = artifact is not None and artifact.is_file() and sha256(artifact) == expected
        records.append({"point": point, "kill_exit": killed, "resume_exit": resumed, "same_sha256": same,
                        "left_by_kill": left})
    seconds = time.perf_counter() - began
    failures = [r for r in records if r["kill_exit"] != -9 or r["resume_exit"] != 0 or not r["same_sha256"]]
    if args.json:
        print(json.dumps({"passages": len(passages), "records": records, "seconds": seconds, "sha256": expected}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"SIGKILL at {len(records)} of the {len(passages)} fault-point passages of a `shrink run`, then --resume")
        for column in ("point", "kill exit", "resume exit", "sha256 as uninterrupted", "left by the kill"):
            table.add_column(column)
        for r in records:
            table.add_row(r["point"], str(r["kill_exit"]), str(r["resume_exit"]), "yes" if r["same_sha256"] else "NO",
                          ", ".join(r["left_by_kill"]) or "-")
        Console().print(table)
        print(f"{len(records)} kills, {len(records) - len(failures)} resumed to the uninterrupted artifact "
              f"(sha256 {expected[:12]}...), {len(failures)} failures; {seconds:.0f} s (measured)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
