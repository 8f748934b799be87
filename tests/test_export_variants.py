"""Puzzle's no-op and linear blocks (blockvariants.py) exported and run in their runtimes: GGUF through
llama.cpp's deci architecture (Llama-shaped families), ONNX for every family, refusals otherwise."""

import copy
import json

import pytest
import torch

from shrink.blockvariants import ffn_variant, mixer_variant
from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.onnx import export_onnx
from shrink.export.onnx_runtime import OnnxRunner
from test_export_onnx import decode_matches_prefill
from shrink.export.runtimes import LlamaCppRunner, TorchRunner
from shrink.export.verify import compare
from shrink.export.workflow import verify_against
from shrink.families import spec_from_model
from shrink.model import LoadedModel
from tiny_models import peaked

IDS = [list(range(1, 41)), [7, 3, 99, 42] * 10]


def with_variants(loaded, layers, peak=False):
    """`loaded` with layer i's mixer and/or FFN replaced: layers = {i: (mixer, ffn)}, each "none", "linear"
    or None (the layer's own). The linear maps get weights of a real size (their default init is tiny)."""
    model = peaked(loaded.model) if peak else loaded.model
    hidden = model.config.hidden_size
    for i, (mixer, ffn) in layers.items():
        block = model.model.layers[i]
        if mixer:
            block.self_attn = mixer_variant(mixer, hidden, model.dtype, i)
        if ffn:
            block.mlp = ffn_variant(ffn, hidden, model.dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "variant", None) == "linear":
                for weight in module.parameters():
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    return LoadedModel(model, loaded.tokenizer, spec_from_model(model), f"{loaded.source}-variants")


def gguf_fields(path):
    """(per-layer n_head, n_head_kv, n_ff, tensor names) as the file stores them."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def array(key):
        field = reader.fields[f"deci.{key}"]
        return [int(field.parts[i][0]) for i in field.data]

    return (array("attention.head_count"), array("attention.head_count_kv"), array("feed_forward_length"),
            {t.name for t in reader.tensors})


# (layers, n_head, n_head_kv, n_ff) in the file: 0 heads is no attention, 0 KV heads linear attention,
# n_ff 0 no FFN, n_ff 1 the zero FFN standing in where deci's n_ff 0 would compute something else
DECI_CASES = {
    "no attention": ({1: ("none", None)}, [4, 0, 4], [2, 0, 2], [48, 48, 48]),
    "no attention in layer 0": ({0: ("none", None)}, [4, 4], [0, 2], [48, 48]),  # a zero linear attention
    "linear attention": ({1: ("linear", None)}, [4, 4, 4], [2, 0, 2], [48, 48, 48]),
    "no FFN beside attention": ({1: (None, "none")}, [4, 4, 4], [2, 2, 2], [48, 1, 48]),
    "empty layer": ({1: ("none", "none")}, [4, 0, 4], [2, 0, 2], [48, 0, 48]),
    "empty last layer": ({2: ("none", "none")}, [4, 4, 0], [2, 2, 0], [48, 48, 1]),
    "linear attention without FFN": ({1: ("linear", "none")}, [4, 4, 4], [2, 0, 2], [48, 1, 48]),
}


@pytest.mark.parametrize("case", DECI_CASES)
def test_each_variant_kind_runs_in_llama_cpp_as_in_pytorch(tmp_path, tiny_model, case):
    layers, heads, kv_heads, ffn = DECI_CASES[case]
    loaded = with_variants(tiny_model("llama", num_hidden_layers=len(heads)), layers)
    report = export_gguf(loaded, tmp_path / "m.gguf", quant="f32")
    assert report.arch == "deci"
    assert gguf_fields(tmp_path / "m.gguf")[:3] == (heads, kv_heads, ffn)
    metrics = compare(TorchRunner(loaded.model), LlamaCppRunner(tmp_path / "m.gguf", 64), IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 2e-3


def test_what_deci_does_not_read_is_not_written(tmp_path, tiny_model):
    loaded = with_variants(tiny_model("llama", num_hidden_layers=3), {1: ("none", "none"), 2: ("linear", None)})
    report = export_gguf(loaded, tmp_path / "m.gguf", quant="f32")
    names = gguf_fields(tmp_path / "m.gguf")[3]
    assert not [n for n in names if n.startswith("blk.1.")]  # llama.cpp refuses a file with tensors it did not load
    assert {n for n in names if n.startswith("blk.2.attn")} == {"blk.2.attn_norm.weight", "blk.2.attn_output.weight"}
    assert "2 norm weights" in report.notes[0]


def test_qwen2_with_variants_exports_as_deci(tmp_path, tiny_model):
    # Qwen2: q/k/v biases and a tied output, which deci loads as Llama's optional tensors
    loaded = with_variants(tiny_model("qwen2", num_hidden_layers=3, layer_types=["full_attention"] * 3),
                           {0: ("none", None), 1: ("linear", "none")})
    report = export_gguf(loaded, tmp_path / "q.gguf", quant="f32")
    assert report.arch == "deci" and "output.weight" not in report.tensor_types
    metrics = compare(TorchRunner(loaded.model), LlamaCppRunner(tmp_path / "q.gguf", 64), IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 2e-3


def test_export_and_verify_commands_pass_a_variant_model(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from shrink.cli.app import app
    from shrink.model import save

    loaded = with_variants(tiny_model("llama", num_hidden_layers=4), {0: ("none", None), 1: ("linear", None),
                                                                      2: (None, "none")}, peak=True)
    source = save(loaded.model, tmp_path / "puzzle")  # records the variants (layershapes) for the reload
    artifact = tmp_path / "puzzle.gguf"
    cli = CliRunner()
    result = cli.invoke(app, ["export", str(source), "-f", "gguf", "--quant", "f32", "-o", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "puzzle.gguf.manifest.json").read_text())
    assert manifest["export"]["arch"] == "deci" and manifest["verify"]["passed"]
    result = cli.invoke(app, ["verify", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["top1_agreement"] == 1.0


def test_a_wrong_linear_map_fails_verification(tmp_path, tiny_model):
    loaded = with_variants(tiny_model("llama", num_hidden_layers=3), {1: ("linear", None)}, peak=True)
    wrong = LoadedModel(copy.deepcopy(loaded.model), None, loaded.spec, "wrong")
    with torch.no_grad():
        wrong.model.model.layers[1].self_attn.o_proj.weight.neg_()
    export_gguf(wrong, tmp_path / "wrong.gguf", quant="f32")
    verdict = verify_against(tmp_path / "wrong.gguf", loaded, "fp32")
    assert not verdict.passed
    export_gguf(loaded, tmp_path / "right.gguf", quant="f32")
    assert verify_against(tmp_path / "right.gguf", loaded, "fp32").passed


def test_deci_n_ff_zero_beside_attention_drops_the_attention(tmp_path, tiny_model, monkeypatch):
    """Why a layer with attention but no FFN is written with a zero FFN of width 1: llama.cpp's deci skips
    the rest of a layer with n_ff 0, the attention's residual sum included. If this starts to pass,
    llama.cpp has changed and export/gguf_deci.py's stand-in can go."""
    import shrink.export.gguf as gguf_export

    def n_ff_zero(spec, state, notes):
        for i, layer in enumerate(spec.layers):
            if layer.ffn is None:
                state.pop(f"model.layers.{i}.post_attention_layernorm.weight")
        return spec

    loaded = with_variants(tiny_model("llama", num_hidden_layers=3), {1: (None, "none")}, peak=True)
    monkeypatch.setattr(gguf_export, "deci_layers", n_ff_zero)
    export_gguf(loaded, tmp_path / "n_ff_0.gguf", quant="f32")
    assert gguf_fields(tmp_path / "n_ff_0.gguf")[2] == [48, 0, 48]
    assert not verify_against(tmp_path / "n_ff_0.gguf", loaded, "fp32").passed


def test_linear_ffn_and_non_deci_families_are_refused_for_gguf(tmp_path, tiny_model):
    linear_ffn = with_variants(tiny_model("llama"), {1: (None, "linear")})
    with pytest.raises(ShrinkError, match="no linear FFN .* layer 1 .* export it as ONNX"):
        export_gguf(linear_ffn, tmp_path / "l.gguf", quant="f32")
    for family, layers in (("gemma3", {0: ("none", None)}), ("qwen3", {1: ("linear", "none")})):
        with pytest.raises(ShrinkError, match=f"only in Llama-shaped .* this {family} model with no-op or linear "
                                              "blocks cannot be a GGUF; export it as ONNX"):
            export_gguf(with_variants(tiny_model(family), layers), tmp_path / "g.gguf", quant="f32", pad_to_uniform=True)
    assert not list(tmp_path.iterdir())


def onnx_inputs(directory):
    import onnx

    return [i.name for i in onnx.load(str(directory / "model.onnx"), load_external_data=False).graph.input]


@pytest.mark.parametrize("family, layers, cached", [
    ("llama", {0: ("none", None), 1: ("linear", "none"), 2: (None, "linear")}, [2, 3]),
    # Gemma 3: layers 0-3 slide over 8 tokens, layer 4 is global; 40 tokens go past the window
    ("gemma3", {0: ("none", None), 1: ("linear", "none"), 2: (None, "linear"), 3: ("none", "none")}, [2, 4]),
])
def test_onnx_runs_variants_with_no_cache_for_them(tmp_path, tiny_model, family, layers, cached):
    shape = {"gemma3": {"num_hidden_layers": 5, "layer_types": ["sliding_attention"] * 4 + ["full_attention"]},
             "llama": {"num_hidden_layers": 4}}[family]
    loaded = with_variants(tiny_model(family, **shape), layers)
    assert family != "gemma3" or [layer.mixer.sliding_window for layer in loaded.spec.layers if layer.mixer_kind == "attention"] == [8, None]
    export_onnx(loaded, tmp_path / "m")
    past = [f"past_{kind}_{i}" for i in cached for kind in ("key", "value")]
    assert onnx_inputs(tmp_path / "m") == ["input_ids", "attention_mask", "position_ids", *past]
    runner = OnnxRunner(tmp_path / "m")
    metrics = compare(TorchRunner(loaded.model), runner, IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 1e-3
    assert decode_matches_prefill(runner, IDS[0]) < 1e-3


def test_onnx_model_without_attention_has_no_cache(tmp_path, tiny_model):
    loaded = with_variants(tiny_model("llama"), {0: ("none", None), 1: ("linear", None)})
    export_onnx(loaded, tmp_path / "m")
    assert onnx_inputs(tmp_path / "m") == ["input_ids", "attention_mask", "position_ids"]
    runner = OnnxRunner(tmp_path / "m")
    assert runner.empty_cache() == {}
    metrics = compare(TorchRunner(loaded.model), runner, IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 1e-3
    assert decode_matches_prefill(runner, IDS[0]) < 1e-3


def test_int4_onnx_quantizes_the_linear_maps(tmp_path, tiny_model):
    import onnx

    loaded = with_variants(tiny_model("llama", num_hidden_layers=3), {0: ("linear", None), 1: (None, "linear"),
                                                                      2: ("none", None)})
    export_onnx(loaded, tmp_path / "m", quant="int4", block_size=16)
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    shapes = [tuple(a.i for a in n.attribute if a.name in ("K", "N")) for n in graph.node if n.op_type == "MatMulNBits"]
    # layer 0: o_proj (32 x 32) and 3 FFN matrices; layer 1: q, k, v, o and the linear FFN (32 x 32); layer 2: FFN;
    # the lm_head: every constant MatMul stored in int4
    assert len(shapes) == 4 + 5 + 3 + 1
    assert shapes.count((32, 32)) == 4  # the two linear maps, layer 1's q_proj and o_proj
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    runner = OnnxRunner(tmp_path / "m")
    assert onnx_inputs(tmp_path / "m")[3:] == ["past_key_1", "past_value_1"]
    assert decode_matches_prefill(runner, IDS[0]) < 1e-3
    assert compare(TorchRunner(loaded.model), runner, IDS).top1_agreement >= 0.5  # it runs and tracks the model
