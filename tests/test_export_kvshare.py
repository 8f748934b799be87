"""Cross-layer KV sharing (compress/kvshare.py) in the artifact: an ONNX graph whose past/present K/V exist for
owner layers only, consumers reading their owner's present K/V inside the graph, run in ONNX Runtime as in
PyTorch (prefill and decoding with a past); GGUF refused in one sentence before anything is written."""

import json

import numpy as np
import onnx
import pytest
import torch
from shrink.compress.kvshare import share_kv
from shrink.compress.quant.plan import make_plan
from shrink.compress.quant.student import fake_quantize, materialize
from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.onnx import LAYOUT_FILE, export_onnx
from shrink.export.onnx_runtime import OnnxRunner
from shrink.export.runtimes import TorchRunner
from shrink.export.verify import compare
from tiny_models import peaked

IDS = [list(range(1, 41)), [7, 3, 99, 42] * 10]
# Gemma 3: layers 0, 1 and 3 slide over 8 tokens (40 go past the window), layers 2 and 4 are global
GEMMA = {"num_hidden_layers": 5, "intermediate_size": 64, "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                                                 "sliding_attention", "full_attention"]}
CASES = {"llama": ("llama", {"num_hidden_layers": 4}, [[0, 1], [2, 3]], [0, 2]),
         "gemma3": ("gemma3", GEMMA, [[0, 1, 3], [2, 4]], [0, 2])}


def shared(tiny_model, case):
    family, shape, groups, _ = CASES[case]
    loaded = tiny_model(family, **shape)
    if family == "gemma3":  # Gemma's norms scale by 1 + w, and w starts at 0: tiny_models.peaked's x16 would be a no-op
        with torch.no_grad():
            loaded.model.model.norm.weight.fill_(15.0)
    else:
        peaked(loaded.model)
    return share_kv(loaded, groups)


def graph_names(directory):
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output], graph


def decode_vs_prefill(runner, ids, prefill=5):
    """The largest logit difference between decoding `ids` token by token after a short prefill (each
    step feeding the present K/V back as past) and one prefill of all of them."""
    full = runner.logits(ids)
    logits, cache = runner.step(ids[:prefill], runner.empty_cache())
    rows = [logits]
    for token in ids[prefill:]:
        logits, cache = runner.step([token], cache)
        rows.append(logits)
    return np.abs(np.concatenate(rows) - full).max(), cache


@pytest.mark.parametrize("case", CASES)
def test_onnx_has_cache_tensors_for_owners_only_and_runs_as_pytorch(tmp_path, tiny_model, case):
    loaded = shared(tiny_model, case)
    owners = CASES[case][3]
    export_onnx(loaded, tmp_path / "m")
    inputs, outputs, _ = graph_names(tmp_path / "m")
    past = [f"past_{kind}_{i}" for i in owners for kind in ("key", "value")]
    assert inputs == ["input_ids", "attention_mask", "position_ids", *past]
    assert outputs == ["logits", *[name.replace("past_", "present_") for name in past]]
    layout = json.loads((tmp_path / "m" / LAYOUT_FILE).read_text())
    consumers = {str(i): group[0] for group in CASES[case][2] for i in group[1:]}
    assert [layer["layer"] for layer in layout["layers"]] == owners and layout["shared_kv"] == consumers

    runner = OnnxRunner(tmp_path / "m")
    metrics = compare(TorchRunner(loaded.model), runner, IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 1e-3
    gap, cache = decode_vs_prefill(runner, IDS[0])
    assert gap < 1e-3
    assert sorted(cache) == sorted(past) and all(t.shape[2] == len(IDS[0]) for t in cache.values())


def test_the_graph_computes_the_shared_model_not_the_original(tmp_path, tiny_model):
    """Not vacuous: with the consumers' K/V projections gone, the ONNX logits after a cached prefix are the shared
    model's (a consumer has no past input of its own, so its past keys can only be its owner's), far from the
    original model's."""
    loaded = shared(tiny_model, "llama")
    export_onnx(loaded, tmp_path / "m")
    runner = OnnxRunner(tmp_path / "m")
    ids = IDS[1]
    _, cache = runner.step(ids[:-1], runner.empty_cache())
    last, _ = runner.step(ids[-1:], cache)
    assert np.abs(TorchRunner(loaded.model).logits(ids)[-1] - last[-1]).max() < 1e-3
    original = peaked(tiny_model("llama", **CASES["llama"][1]).model)
    assert np.abs(TorchRunner(original).logits(ids)[-1] - last[-1]).max() > 1e-2


def int4_matmuls(graph):
    return [tuple(a.i for a in n.attribute if a.name in ("K", "N")) for n in graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.parametrize("case", CASES)
def test_export_and_verify_commands_pass_a_shared_model_and_gguf_is_refused(tmp_path, tiny_model, case):
    """Llama in f32; Gemma 3 as an int4 student on ONNX Runtime's grid (shrink quantize --runtime onnx), so
    that verify compares like with like, as a quantized run's export does."""
    from shrink.cli.app import app
    from shrink.model import save
    from typer.testing import CliRunner

    cli = CliRunner()
    model = shared(tiny_model, case).model
    if case == "gemma3":
        plan = make_plan(model, "int4", "onnx")
        materialize(fake_quantize(model, plan), plan)
    source = save(model, tmp_path / case)  # kv_source (and the plan) recorded for the reload
    artifact = tmp_path / "onnx"
    result = cli.invoke(app, ["export", str(source), "-f", "onnx", "-o", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["verify"]["passed"], manifest["verify"]
    inputs, _, graph = graph_names(artifact)
    assert inputs[3:] == ["past_key_0", "past_value_0", "past_key_2", "past_value_2"]
    result = cli.invoke(app, ["verify", str(artifact), "--json"])
    assert result.exit_code == 0, result.output
    assert decode_vs_prefill(OnnxRunner(artifact), IDS[0])[0] < 1e-3
    if case == "gemma3":
        # per layer q (32 -> 64), o (64 -> 32) and three FFN matrices (32 <-> 64); k and v (32 -> 32) only in the
        # 2 owners (the student's lm_head stays f32)
        shapes = int4_matmuls(graph)
        assert len(shapes) == len(plan.tensors) == 5 * 5 + 2 * 2 and shapes.count((32, 32)) == 2 * 2
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli.invoke(app, ["export", str(source), "-f", "gguf", "--quant", "f32", "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code != 0
    assert "cannot be a GGUF; export it as ONNX" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_gguf_refuses_shared_kv_before_writing_and_a_recipe_before_any_work(tmp_path, tiny_model):
    from shrink.flows.preflight import refuse_early
    from shrink.flows.recipe import ExportStep, KVShareStep
    from shrink.model import save

    loaded = shared(tiny_model, "gemma3")
    with pytest.raises(ShrinkError, match=r"^llama.cpp shares a KV cache .* gemma3 model whose layers read another "
                                          r"layer's cache .* cannot be a GGUF; export it as ONNX \(--format onnx\) instead\.$"):
        export_gguf(loaded, tmp_path / "m.gguf", quant="f32")
    assert not list(tmp_path.iterdir())
    plain = save(tiny_model("llama").model, tmp_path / "plain")
    with pytest.raises(ShrinkError, match="llama model whose layers read another layer's cache"):
        refuse_early(str(plain), [("kv-share", KVShareStep()), ("export", ExportStep(format="gguf"))])
    refuse_early(str(plain), [("kv-share", KVShareStep()), ("export", ExportStep(format="onnx"))])


def down_proj_lengths(directory, ids):
    """The sequence length each layer's FFN down projection computes in ONNX Runtime on a prompt of `ids`
    (its MatMul found by the module path the exporter records; its output made a graph output)."""
    import onnxruntime as ort

    model = onnx.load(str(directory / "model.onnx"))
    layers = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        for scope in eval(scopes or "[]"):  # a Python list literal written by the exporter
            parts = scope.split(".")
            if node.op_type == "MatMul" and parts[-2:] == ["mlp", "down_proj"] and parts[-4] == "layers":
                layers[int(parts[-3])] = node.output[0]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in layers.values())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runner = OnnxRunner(directory)
    feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids))[None], **runner.empty_cache()}
    outputs = dict(zip([o.name for o in model.graph.output], session.run(None, feed)))
    return [outputs[layers[i]].shape[1] for i in sorted(layers)], outputs["logits"].shape


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_single_input_kv_graph_runs_the_prompt_through_layers_below_k_only(tmp_path, tiny_model, family):
    """SwiftKV's prefill in the artifact: layers from k on compute the prompt's last token only (their FFN
    sees one row), the graph returns the last position's logits, and decoding from its cache, verify and
    the present K/V equal PyTorch's full forward."""
    from shrink.compress.swiftkv import single_input_kv
    from transformers import DynamicCache

    shape = GEMMA if family == "gemma3" else {"num_hidden_layers": 4}
    loaded = tiny_model(family, **shape)
    peaked(loaded.model)
    swift = single_input_kv(loaded, 2)
    with torch.no_grad():
        norm = swift.model.model.layers[2].input_layernorm.kv_norm
        norm.weight.add_(0.3 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1)))
    export_onnx(swift, tmp_path / "m")
    layout = json.loads((tmp_path / "m" / LAYOUT_FILE).read_text())
    assert layout["logits"] == "last"
    lengths, logits_shape = down_proj_lengths(tmp_path / "m", IDS[0])
    assert lengths == [40 if i < 2 else 1 for i in range(swift.spec.num_layers)] and logits_shape[1] == 1

    runner = OnnxRunner(tmp_path / "m")
    metrics = compare(TorchRunner(swift.model), runner, IDS)  # every position, one decode step at a time
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 1e-3
    last, cache = runner.step(IDS[1], runner.empty_cache())
    with torch.no_grad():
        reference = DynamicCache(config=swift.model.config)
        full = swift.model(torch.tensor([IDS[1]]), cache=reference, use_cache=True).logits[0]
    assert last.shape[0] == 1 and np.abs(last[-1] - full[-1].numpy()).max() < 1e-3
    for i, layer in enumerate(reference.layers):  # transformers' sliding layers keep the window's last positions
        kept = layer.keys.shape[2]
        assert np.abs(cache[f"past_key_{i}"][:, :, -kept:] - layer.keys.numpy()).max() < 1e-3
        assert np.abs(cache[f"past_value_{i}"][:, :, -kept:] - layer.values.numpy()).max() < 1e-3
    with pytest.raises(ShrinkError, match="returns the last position's logits only"):
        export_onnx(swift, tmp_path / "all", logits="all")
    export_onnx(loaded, tmp_path / "plain", logits="last")  # any model may return its last logits only
    lengths, logits_shape = down_proj_lengths(tmp_path / "plain", IDS[0])
    assert set(lengths) == {40} and logits_shape[1] == 1
    assert compare(TorchRunner(loaded.model), OnnxRunner(tmp_path / "plain"), IDS).max_abs_logit_diff < 1e-3


def test_export_command_takes_logits_last_for_onnx_and_refuses_it_elsewhere(tmp_path, tiny_model):
    from shrink.cli.app import app
    from shrink.model import save
    from typer.testing import CliRunner

    cli = CliRunner()
    source = save(tiny_model("llama").model, tmp_path / "m")
    result = cli.invoke(app, ["export", str(source), "-f", "onnx", "--logits", "last", "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "onnx" / LAYOUT_FILE).read_text())["logits"] == "last"
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["verify"]["passed"]
    for args, message in ((["-f", "gguf", "--logits", "last"], "does not apply to GGUF"),
                          (["-f", "onnx", "--logits", "first"], "Unknown --logits 'first'")):
        result = cli.invoke(app, ["export", str(source), *args, "-o", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "bad").exists()
