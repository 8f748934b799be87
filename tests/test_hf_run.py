"""`shrink run` on a Hugging Face directory (weights, config.json, tokenizer.json: what a user downloads)
reaches a verified GGUF, by recipe and by plan, a non-uniform Llama through llama.cpp's `deci`."""

import json

from typer.testing import CliRunner

from shrink.cli.app import app

RECIPE = """description = "distil and ship to llama.cpp"

[[step]]
name = "distill"
tokens = 512
lr = 1e-3

[[step]]
name = "export"
format = "gguf"
quant = "q8_0"

[[step]]
name = "verify"
"""


def _run(args, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    return CliRunner().invoke(app, ["run", *args, "--json"])


def _run_recipe(model_dir, text, tmp_path, monkeypatch):
    """RECIPE on `model_dir`: the run report, after asserting that it succeeded."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    result = _run([str(model_dir), "--recipe", str(recipe), "-o", str(tmp_path / "run"), "--data", str(text),
                   "--seq-len", "32"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _checks(report, step):
    return {c["name"]: c for c in next(s for s in report["steps"] if s["name"] == step)["metrics"]["checks"]}


def test_a_recipe_takes_a_hugging_face_directory_to_a_verified_gguf(tiny_bpe_model_dir, tmp_path, monkeypatch):
    report = _run_recipe(*tiny_bpe_model_dir, tmp_path, monkeypatch)
    assert report["final"]["artifact"].endswith(".gguf")
    assert _checks(report, "verify")["tokenizer parity"]["passed"]


def test_a_non_uniform_llama_runs_through_deci(tiny_bpe_model_dir, tmp_path, monkeypatch):
    from shrink.ggufmeta import tensor_infos

    model_dir, text = tiny_bpe_model_dir
    pruned = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", str(model_dir), "--ffn", "40,24,32,16", "-o", str(pruned),
                                      "--data", str(text), "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    report = _run_recipe(pruned, text, tmp_path, monkeypatch)
    export = next(s for s in report["steps"] if s["name"] == "export")["metrics"]["export"]
    assert export["arch"] == "deci"
    widths = [t.shape[1] for t in tensor_infos(report["final"]["artifact"]) if t.name.endswith("ffn_up.weight")]
    assert widths == [40, 24, 32, 16]  # each layer keeps its own width: the saving is real
    assert _checks(report, "verify")["tokenizer parity"]["passed"]


def test_a_plan_on_a_llama_cpp_target_takes_a_hugging_face_directory_to_a_verified_gguf(tiny_bpe_model_dir, tmp_path,
                                                                                       monkeypatch):
    model_dir, text = tiny_bpe_model_dir
    result = _run([str(model_dir), "--target", "jetson-orin-nano", "--budget", "1s", "-o", str(tmp_path / "run"),
                   "--data", str(text), "--seq-len", "32", "--tokens", "256", "--qad-tokens", "0",
                   "--proxy-steps", "0"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["final"]["artifact"].endswith(".gguf")
    assert report["budget_check"]["passed"]
    assert _checks(report, "verify")["tokenizer parity"]["passed"]


def test_a_run_refuses_a_tokenizer_llama_cpp_cannot_reproduce_before_any_work(tmp_path, monkeypatch, tiny_model):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from shrink.export.prompts import DEFAULT_TEXTS
    from shrink.model import save

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(DEFAULT_TEXTS * 3, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                          show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    model_dir = save(tiny_model("llama", vocab_size=len(tokenizer)).model, tmp_path / "wordpiece", tokenizer=tokenizer)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    for args in (["--recipe", str(recipe)], ["--target", "jetson-orin-nano", "--budget", "1s"]):
        result = _run([str(model_dir), *args, "-o", str(tmp_path / "run")], tmp_path, monkeypatch)
        assert result.exit_code == 2, result.output
        assert "WordPiece" in result.output and "ONNX" in result.output
        assert not (tmp_path / "run").exists()  # nothing started, nothing written
