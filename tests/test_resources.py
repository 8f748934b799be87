"""Disk and memory checked before the expensive work (flows/resources.py): the estimates from the
ArchSpec and the steps, and `shrink run`, `shrink export` and `shrink distill` refusing with both
numbers (free or available figures monkeypatched) before they write or load anything."""

import pytest
from typer.testing import CliRunner

from shrink.cli.app import app
from shrink.errors import ShrinkError
from shrink.flows import resources
from shrink.flows.recipe import DistillStep, ExportStep, KVShareStep, PruneStep, QuantizeStep, SingleInputKVStep
from shrink.model import load_spec

RECIPE = '[[step]]\nname = "prune"\nparams = 0.5\n\n[[step]]\nname = "distill"\ntokens = 1024\n\n' \
         '[[step]]\nname = "export"\nformat = "onnx"\n'


def test_the_estimates_follow_the_spec_and_the_steps(tiny_text_model_dir, monkeypatch):
    monkeypatch.setattr(resources, "_on_accelerator", lambda: False)
    spec = load_spec(str(tiny_text_model_dir[0]))
    counts = spec.param_counts()
    total, emb = counts.total, counts.embedding
    export = resources.run_needs(spec, [("export", ExportStep(format="gguf", quant="q8_0"))])
    assert export.disk == int(total * 8.5 / 8) and export.memory == 4 * total + 8 * total + export.disk
    half = emb + int(0.5 * (total - emb))
    steps = [("prune", PruneStep(params=0.5)), ("distill", DistillStep(tokens=1024, batch_size=2)),
             ("export", ExportStep(format="onnx"))]
    needs = resources.run_needs(spec, steps, seq_len=32)
    # at the peak: the pruned model, the distilled one and its checkpoint (weights and AdamW's moments)
    assert needs.disk == 4 * half + 4 * half + 12 * half
    training = 4 * total + 16 * half + 3 * 4 * 2 * 32 * spec.vocab_size
    assert needs.memory == training and needs.memory_by == "distill"
    resumed = resources.run_needs(spec, steps, seq_len=32, done=2)  # prune and distill finished before --resume
    assert resumed.disk == 4 * half and resumed.parts == [f"export {resources.fmt_bytes(4 * half)}"]
    qad = resources.run_needs(spec, [("quantize", QuantizeStep(format="int4", qad=True)), ("export", ExportStep())])
    assert qad.disk == 4 * total + 12 * total and qad.memory_by == "quantize"
    # K/V transforms: sharing writes a copy; SingleInputKV's first stage trains with a checkpoint, untrained none
    shared = resources.run_needs(spec, [("kv-share", KVShareStep())])
    assert shared.disk == 4 * total and shared.memory == 12 * total
    swift = resources.run_needs(spec, [("single-input-kv", SingleInputKVStep(tokens=1024))], seq_len=32)
    assert swift.disk == 4 * total + 12 * total and swift.memory_by == "single-input-kv"
    assert resources.run_needs(spec, [("single-input-kv", SingleInputKVStep(tokens=0))]).disk == 4 * total


def test_a_run_that_cannot_fit_on_disk_is_refused_before_its_directory_exists(tiny_text_model_dir, tmp_path,
                                                                              monkeypatch):
    model, _ = tiny_text_model_dir
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    monkeypatch.setattr(resources, "free_disk", lambda path: 999)
    result = CliRunner().invoke(app, ["run", str(model), "--recipe", str(recipe), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "This run writes at least" in text and "has 999 B free" in text and "prune" in text
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_run_whose_working_set_exceeds_memory_is_refused_with_both_numbers(tiny_text_model_dir, tmp_path,
                                                                            monkeypatch):
    from shrink.flows.recipe import parse_recipe
    from shrink.flows.run import execute

    model, _ = tiny_text_model_dir
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    monkeypatch.setattr(resources, "available_memory", lambda: 100_000)
    monkeypatch.setattr(resources, "_on_accelerator", lambda: False)
    needs = resources.run_needs(load_spec(str(model)), parse_recipe(recipe))
    assert needs.memory > 100_000
    with pytest.raises(ShrinkError, match=f"needs at least {resources.fmt_bytes(needs.memory)} of memory "
                                          r"\(estimated, at its distill step\) but this machine has 100.00 kB available"):
        execute(str(model), parse_recipe(recipe), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_and_distill_are_refused_before_loading(tiny_text_model_dir, tmp_path, monkeypatch):
    model, text = tiny_text_model_dir
    monkeypatch.setattr(resources, "free_disk", lambda path: 10)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(app, ["export", str(model), "-f", "onnx", "-o", str(out)])
    assert result.exit_code == 2 and "This export writes at least" in " ".join(result.output.split())
    assert not out.exists()
    monkeypatch.setattr(resources, "free_disk", lambda path: 10**15)
    monkeypatch.setattr(resources, "available_memory", lambda: 999)
    result = CliRunner().invoke(app, ["distill", str(model), "--teacher", str(model), "--data", str(text),
                                      "-o", str(tmp_path / "d")])
    assert result.exit_code == 2 and "has 999 B available" in " ".join(result.output.split())
    assert not (tmp_path / "d").exists()


def test_the_real_figures_are_read(tmp_path):
    assert resources.free_disk(tmp_path / "not" / "yet") > 0 and resources.available_memory() > 0
