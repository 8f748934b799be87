"""A `shrink run` killed by SIGKILL anywhere resumes to the uninterrupted run's artifact, byte for byte
(benchmarks/kill_resume.py at the size that fits the suite; the script alone tries about 20 points)."""

import json
import subprocess
import sys
from pathlib import Path

from shrink.storage import fault_point, remove_leftovers

HARNESS = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_resume.py"


def test_kills_at_fault_points_resume_to_the_same_artifact(tmp_path):
    out = subprocess.run([sys.executable, str(HARNESS), "--points", "3", "--workdir", str(tmp_path), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    result = json.loads(out.stdout)
    assert result["passages"] >= 20  # steps, caches, checkpoints, artifact, manifest, report
    assert len(result["records"]) == 3
    for record in result["records"]:
        assert record["kill_exit"] == -9 and record["resume_exit"] == 0 and record["same_sha256"], record
    kinds = {record["point"].split(":")[0] for record in result["records"]}
    assert len(kinds) >= 2  # spread over different kinds of point
    # the resumed runs' directories hold no half-written leftovers of their kills
    for trial in tmp_path.glob("trial-*"):
        if not trial.name.endswith("cache"):
            assert not [p for p in trial.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_fault_points_do_nothing_unless_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("SHRINK_KILL_AT", raising=False)
    monkeypatch.setenv("SHRINK_FAULT_TRACE", str(tmp_path / "trace"))
    fault_point("write:a")
    fault_point("write:a")
    monkeypatch.setenv("SHRINK_KILL_AT", "write:b#2")
    fault_point("write:b")  # the first passage: not the one named
    assert (tmp_path / "trace").read_text().split() == ["write:a#1", "write:a#2", "write:b#1"]


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / ".model.gguf.x1.tmp").write_text("half")
    (tmp_path / ".checkpoint.old").mkdir()
    (tmp_path / ".checkpoint.old" / "student.safetensors").write_text("old")
    (tmp_path / "step" / "model.gguf").write_text("whole")
    removed = remove_leftovers(tmp_path)
    assert len(removed) == 2 and (tmp_path / "step" / "model.gguf").read_text() == "whole"
