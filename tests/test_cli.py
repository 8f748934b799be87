"""The command line as a user meets it: tables, --json, charts, and one-sentence errors."""

import json

import pytest
from typer.testing import CliRunner

from shrink.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_inspect_json_counts_match_the_instantiated_model(tiny_llama_dir):
    result = run("inspect", str(tiny_llama_dir), "--load", "--json")
    assert result.exit_code == 0, result.output
    params = json.loads(result.stdout)["params"]
    assert params["total"] == params["instantiated"]
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    # an untied tiny Llama: embedding and lm_head tables of vocab x hidden each
    assert not config["tie_word_embeddings"]
    assert params["embedding"] == 2 * config["vocab_size"] * config["hidden_size"]


def test_inspect_table(tiny_llama_dir):
    result = run("inspect", str(tiny_llama_dir))
    assert result.exit_code == 0
    assert "parameters" in result.stdout and "gated 48" in result.stdout


def test_estimate_single_target_table_and_json():
    result = run("estimate", "llama-3.1-8b", "--target", "jetson-agx-orin", "--weights", "int4")
    assert result.exit_code == 0, result.output
    assert "Estimated (roofline)" in result.stdout and "time per output token" in result.stdout
    data = json.loads(run("estimate", "llama-3.1-8b", "-t", "h100", "--json").stdout)
    (only,) = data["estimates"]
    assert only["kind"] == "estimate" and only["target"] == "h100-sxm"
    assert only["tpot_s"] > 0 and only["memory"]["fits"] is True


def test_estimate_all_targets_in_one_table():
    result = run("estimate", "llama-3.1-8b", "--target", "all")
    assert result.exit_code == 0
    for name in ("h100-sxm", "jetson-agx-orin", "jetson-orin-nano", "sg2042", "phone-sd8g3", "host"):
        assert name in result.stdout


def test_estimate_plot_writes_a_png(tmp_path):
    path = tmp_path / "roofline.png"
    result = run("estimate", "llama-3.1-8b", "--target", "jetson-orin-nano", "--plot", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiles_list_and_show():
    assert "sg2042" in run("profiles").stdout
    shown = run("profiles", "show", "jetson-agx-orin")
    assert shown.exit_code == 0 and "source: compute" in shown.stdout
    assert json.loads(run("profiles", "show", "phone", "--json").stdout)["name"] == "phone-sd8g3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["estimate", "llama-3.1-8b", "--target", "tpu-v9"], "Unknown target 'tpu-v9'"),
        (["estimate", "/no/such/model", "--target", "h100"], "No such file or directory"),
        (["estimate", "llama-3.1-8b", "--target", "/no/such.toml"], "does not exist"),
        (["estimate", "llama-3.1-8b", "--batch", "0"], "batch must be a positive whole number"),
        (["estimate", "llama-3.1-8b", "--weights", "int3"], "Unknown number format"),
        (["estimate", "llama-3.1-8b", "--plot", "x.png"], "single --target"),
        (["profiles", "show", "nope"], "Unknown target 'nope'"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_malformed_profile_via_cli(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\n')
    result = run("estimate", "llama-3.1-8b", "--target", str(path))
    assert result.exit_code == 2 and "missing key" in result.output


def test_formats_lists_bits_per_weight():
    data = json.loads(run("formats", "--json").stdout)
    q4_0 = next(d for d in data["formats"] if d["name"] == "q4_0")
    # 18 bytes per block of 32 (an fp16 scale and 16 bytes of nibbles): 4.5 bits
    assert {"bits_per_element": 4.5, "compute": "int4", "gguf_type": "Q4_0", "runtime": "gguf"}.items() <= q4_0.items()
    assert q4_0["gate"]["reason"] and data["families"]["int4"]["gguf"] == "q4_0"


def test_training_progress_reaches_a_ci_log_as_lines(caplog, monkeypatch):
    """stderr not a terminal (CI): the first and last steps and one line per interval, rate and time left."""
    import logging

    import shrink.progress as progress
    from shrink.cli.render import Spinner, err_console
    from shrink.cli.training import cli_hooks

    assert not err_console.is_terminal  # pytest captures stderr
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 75.0])  # started, then one reading per step
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="shrink"):
        with cli_hooks(Spinner()).training("distilling", 5, True) as report:
            for step in range(1, 6):
                report(step, 1.0 / step, 1000.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("distilling:")]
    # step 1 (first), step 3 at 40 s (30 s after the last line), step 5 (last); steps 2 and 4 fall inside
    assert [line.split(",")[0] for line in lines] == ["distilling: step 1/5", "distilling: step 3/5",
                                                      "distilling: step 5/5"]
    assert "1,000 tok/s" in lines[0] and "s left (estimated)" in lines[0]
