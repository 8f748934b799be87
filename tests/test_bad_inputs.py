"""The battery of bad inputs (benchmarks/bad_inputs.py) in CI: its cases in-process through typer's
CliRunner (the script runs each as its own `python -m shrink` process), and the three counts that must
stay at zero: tracebacks, zero exit codes, half-written outputs. Every case answers before a model
loads, so the whole battery runs here."""

import importlib.util
from pathlib import Path


SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bad_inputs.py"


def _battery():
    spec = importlib.util.spec_from_file_location("bad_inputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_bad_input_ends_in_one_sentence_and_a_nonzero_exit(tmp_path, monkeypatch):
    battery = _battery()
    monkeypatch.chdir(tmp_path)
    made = battery.files(tmp_path / "in")
    cases = battery.cases(made, tmp_path / "out")
    assert len(cases) >= 40
    tracebacks, zero, half = [], [], []
    for what, argv, output in cases:
        case = battery.run_case(argv, output, tmp_path, in_process=True)
        if case["traceback"]:
            tracebacks.append(f"{what}: {case['text'].strip().splitlines()[-1]}")
        if case["exit"] == 0:
            zero.append(what)
        if case["half_written"]:
            half.append(what)
    assert (tracebacks, zero, half) == ([], [], []), (tracebacks, zero, half)
