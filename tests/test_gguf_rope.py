"""RoPE scaling in GGUF exports: llama.cpp reproduces transformers' logits at positions beyond the
original context (llama3, linear, YaRN; Gemma 3's per-layer-type RoPE), and what it cannot reproduce
is refused in one sentence, by the CLI before any weight is loaded."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from shrink.cli.app import app
from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.gguf_rope import check_rope, llama3_factors, rope_parameters
from shrink.export.runtimes import LlamaCppRunner, TorchRunner

ORIGINAL = 32  # original_max_position_embeddings of every scaled config here
IDS = [int(i) for i in torch.randint(1, 100, (96,), generator=torch.Generator().manual_seed(3))]  # 64 beyond it
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIGINAL, "rope_theta": 500.0}
LINEAR = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "rope_theta": 500.0}
SCALED = {
    "llama3": ("llama", {"rope_parameters": LLAMA3, "head_dim": 16}),
    "linear": ("llama", {"rope_parameters": LINEAR, "head_dim": 16}),
    "yarn": ("llama", {"rope_parameters": YARN, "head_dim": 16}),
    # Hugging Face's own attention factor: carried as llama.cpp's rope.scaling.attn_factor ratio
    "yarn-attention-factor": ("qwen3", {"rope_parameters": {**YARN, "attention_factor": 1.3}}),
    "yarn-mscale": ("llama", {"rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0}, "head_dim": 16}),
    "qwen2-linear": ("qwen2", {"rope_parameters": LINEAR}),
    # Gemma 3 (larger sizes): linear x8 on the global layers only; the sliding layers keep their own base
    "gemma3-linear": ("gemma3", {"rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}}),
    "gemma3-yarn": ("gemma3", {"rope_parameters": {
        "full_attention": {**YARN, "rope_theta": 1000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
}


def _sharpened(loaded, factor=8.0):
    """Scale q and k so that attention depends on positions (a random tiny model attends almost
    uniformly, and any RoPE would pass)."""
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return loaded


def _unscaled(rope: dict) -> dict:
    if "full_attention" in rope:
        return {kind: _unscaled(params) for kind, params in rope.items()}
    return {"rope_type": "default", "rope_theta": rope["rope_theta"]}


def test_llama3_factors_are_the_ratio_of_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=dict(LLAMA3))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (500.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = llama3_factors(rope_parameters(config), 16)
    assert factors.dtype == np.float32 and factors.shape == (8,)
    np.testing.assert_allclose(factors, (default / scaled).numpy(), rtol=1e-6)
    # all three regimes occur: kept (short wavelengths), slowed by the factor, and blended between
    assert factors[0] == 1.0 and factors[-1] == 8.0 and any(1.0 < f < 8.0 for f in factors)


@pytest.mark.parametrize("case", list(SCALED))
def test_scaled_rope_matches_transformers_beyond_the_original_context(tmp_path, tiny_model, case):
    family, overrides = SCALED[case]
    loaded = _sharpened(tiny_model(family, max_position_embeddings=256, **overrides))
    export_gguf(loaded, tmp_path / "m.gguf", quant="f32")
    reference = TorchRunner(loaded.model).logits(IDS)
    artifact = LlamaCppRunner(tmp_path / "m.gguf", 128).logits(IDS)
    beyond = np.abs(reference - artifact)[ORIGINAL:].max()
    assert beyond < 2e-3, f"{case}: llama.cpp differs by {beyond:.2e} beyond the original context"
    # the scaling matters at these positions: the same weights without it are far from both
    plain = _sharpened(tiny_model(family, max_position_embeddings=256,
                                  **{**overrides, "rope_parameters": _unscaled(overrides["rope_parameters"])}))
    unscaled = np.abs(reference - TorchRunner(plain.model).logits(IDS))[ORIGINAL:].max()
    assert unscaled > 20 * max(beyond, 1e-4), f"{case}: RoPE scaling moves logits by only {unscaled:.2e}"


def test_llama3_writes_rope_freqs_for_deci_too(tmp_path, tiny_model):
    from test_export_gguf import _non_uniform_llama

    loaded = _non_uniform_llama(lambda name, **kw: tiny_model(name, max_position_embeddings=256, **kw,
                                                             rope_parameters=LLAMA3))
    report = export_gguf(_sharpened(loaded), tmp_path / "deci.gguf", quant="f32")
    assert report.arch == "deci"
    reference = TorchRunner(loaded.model).logits(IDS)
    artifact = LlamaCppRunner(tmp_path / "deci.gguf", 128).logits(IDS)
    assert np.abs(reference - artifact)[ORIGINAL:].max() < 2e-3


REFUSED = [
    ("llama", {"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
    ("llama", {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}, "'longrope'"),
    ("llama", {"rope_type": "mystery-ntk", "factor": 2.0}, "'mystery-ntk'"),
    ("llama", {**YARN, "beta_fast": 8.0, "beta_slow": 2.0}, "beta_fast/beta_slow 8/2"),
    ("llama", {**YARN, "truncate": False}, "truncate=false"),
    ("llama", {"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ("qwen3", LLAMA3, "rope_freqs"),
    ("gemma3", {"full_attention": LINEAR, "sliding_attention": LINEAR}, "sliding-window layers"),
    ("gemma3", {"full_attention": {**YARN, "attention_factor": 1.0}, "sliding_attention": {"rope_type": "default"}},
     "attention factor"),
]


@pytest.mark.parametrize("family, rope, named", REFUSED)
def test_what_llama_cpp_cannot_reproduce_is_refused_in_one_sentence(family, rope, named):
    from types import SimpleNamespace

    arch = {"llama": "llama", "qwen3": "qwen3", "gemma3": "gemma3"}[family]
    with pytest.raises(ShrinkError) as err:
        check_rope(SimpleNamespace(rope_parameters=rope, max_position_embeddings=256), arch)
    message = str(err.value)
    assert named in message and "ONNX" in message and message.count(". ") == 0 and message.endswith(".")


def test_a_refused_rope_leaves_no_file(tmp_path, tiny_model):
    loaded = tiny_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500.0})
    with pytest.raises(ShrinkError, match="'dynamic'"):
        export_gguf(loaded, tmp_path / "m.gguf", quant="f32")
    assert not (tmp_path / "m.gguf").exists()


def test_old_style_configs_read_the_same():
    from types import SimpleNamespace

    # a transformers 4 config.json: rope_scaling with "type", rope_theta beside it; Gemma 3's local base
    old = SimpleNamespace(rope_scaling={"type": "linear", "factor": 8.0}, rope_theta=1e6, rope_local_base_freq=1e4)
    assert rope_parameters(old)["rope_type"] == "linear" and rope_parameters(old)["rope_theta"] == 1e6
    assert rope_parameters(old, "sliding_attention") == {"rope_type": "default", "rope_theta": 1e4,
                                                         "original_max_position_embeddings": None}
    check_rope(old, "gemma3")


# --- the CLI: an unknown RoPE type is refused before any weight is loaded ---

@pytest.fixture
def mystery_rope_dir(tmp_path, tiny_model):
    from shrink.model import save

    directory = save(tiny_model("llama").model, tmp_path / "mystery")
    config = json.loads((directory / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "mystery-ntk", "factor": 4.0, "rope_theta": 10000.0}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def no_loading(monkeypatch):
    """Every way a command reads weights, recorded: a refusal before any work leaves it empty."""
    import shrink.cli.export
    import shrink.flows.plan
    import shrink.flows.run
    import shrink.flows.steps

    calls = []
    for module in (shrink.cli.export, shrink.flows.plan, shrink.flows.run, shrink.flows.steps):
        monkeypatch.setattr(module, "load", lambda *args, **kwargs: calls.append(args) or pytest.fail("loaded"))
    return calls


def _refused(result, calls):
    assert result.exit_code == 2, result.output
    assert "RoPE type 'mystery-ntk'" in result.output and "ONNX" in result.output
    assert "Traceback" not in result.output and calls == []


def test_cli_refuses_an_unknown_rope_type_before_any_work(mystery_rope_dir, tmp_path, no_loading):
    cli = CliRunner()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\nname = "prune"\nparams = 0.6\n\n[[step]]\nname = "distill"\ntokens = 4096\n\n'
                      '[[step]]\nname = "export"\nformat = "gguf"\n')
    run_dir = tmp_path / "run"
    _refused(cli.invoke(app, ["run", str(mystery_rope_dir), "--recipe", str(recipe), "-o", str(run_dir)]), no_loading)
    assert not run_dir.exists()  # not even a run directory
    planned = tmp_path / "planned"
    _refused(cli.invoke(app, ["run", str(mystery_rope_dir), "--target", "jetson-orin-nano", "--budget", "20ms",
                              "-o", str(planned)]), no_loading)
    assert not planned.exists()
    _refused(cli.invoke(app, ["export", str(mystery_rope_dir), "-f", "gguf", "-o", str(tmp_path / "m.gguf")]), no_loading)
    assert not (tmp_path / "m.gguf").exists()


def test_cli_preflight_passes_a_llama3_config_and_onnx_runs(mystery_rope_dir, tmp_path):
    from shrink.flows.preflight import check_gguf_export, refuse_early
    from shrink.flows.recipe import ExportStep

    refuse_early(str(mystery_rope_dir), [("export", ExportStep(format="onnx"))])  # ONNX runs the model's own RoPE
    with pytest.raises(ShrinkError, match="mystery-ntk"):
        refuse_early(str(mystery_rope_dir), [("export", ExportStep(format="gguf"))])
    config = json.loads((mystery_rope_dir / "config.json").read_text())
    config["rope_parameters"] = dict(LLAMA3)
    (mystery_rope_dir / "config.json").write_text(json.dumps(config))
    check_gguf_export(str(mystery_rope_dir))
