"""Numeric faults are named where they first show, in one sentence: NaN or infinite weights on load,
calibration activations that overflow (importance, AWQ, the teacher's logits), a NaN loss (stops at
its step). Float16 overflow and non-finite weights before an export: tests/test_export_gguf.py and
tests/test_export_onnx.py."""

import pytest
import torch

from shrink.errors import ShrinkError

IDS = torch.randint(0, 101, (6, 16), generator=torch.Generator().manual_seed(0))


def _one_sentence(err: ShrinkError) -> str:
    text = str(err)
    assert "\n" not in text and ". " not in text.rstrip(".") and text.endswith("."), text
    return text


def test_a_nan_weight_is_refused_on_load_naming_the_tensor(tiny_model, tmp_path):
    from shrink.model import load, save

    model = tiny_model("llama").model
    save(model, tmp_path / "good")
    assert load(str(tmp_path / "good")).spec.family == "llama"
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3, 2] = float("nan")
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("-inf")
    save(model, tmp_path / "damaged")
    with pytest.raises(ShrinkError, match=r"holds 2 NaN or infinite value\(s\) in model.layers.1.mlp.gate_proj.weight") as err:
        load(str(tmp_path / "damaged"))
    _one_sentence(err.value)


def test_the_cli_refuses_a_damaged_model_with_exit_code_2(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from shrink.cli.app import app
    from shrink.model import save

    model = tiny_model("llama").model
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 5] = float("inf")
    save(model, tmp_path / "damaged")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "damaged"), "-f", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 2 and "model.embed_tokens.weight" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.gguf").exists()


def test_overflowing_calibration_activations_are_named_by_layer(tiny_model):
    from shrink.compress.importance import score

    loaded = tiny_model("llama", num_hidden_layers=3)
    score(loaded, IDS)  # finite: no complaint
    with torch.no_grad():  # finite weights whose products overflow float32 in layer 1's FFN
        loaded.model.model.layers[1].mlp.up_proj.weight.mul_(1e25)
        loaded.model.model.layers[1].mlp.down_proj.weight.mul_(1e25)
    with pytest.raises(ShrinkError, match="NaN or infinite at the output of layer 1,") as err:
        score(loaded, IDS)
    _one_sentence(err.value)


def test_a_nan_activation_entering_a_projection_stops_the_ffn_check_first(tiny_model):
    from shrink.compress.importance import score

    loaded = tiny_model("llama", num_hidden_layers=2)
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ShrinkError, match="layer 0's FFN activation entering down_proj"):
        score(loaded, IDS)


def test_awq_names_the_projection_whose_inputs_are_not_finite(tiny_model):
    from shrink.compress.quant.plan import make_plan
    from shrink.compress.quant.ptq import awq

    loaded = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=16,
                        num_attention_heads=4, num_key_value_heads=4)
    plan = make_plan(loaded.model, "int4", "gguf")
    with torch.no_grad():
        loaded.model.model.layers[0].input_layernorm.weight[7] = float("inf")
    with pytest.raises(ShrinkError, match="entering model.layers.0.self_attn.q_proj are NaN or infinite") as err:
        awq(loaded.model, plan, IDS, "llama")
    _one_sentence(err.value)


def test_a_teacher_with_nan_logits_is_refused_before_its_cache_is_written(tiny_model, tmp_path, monkeypatch):
    from shrink.compress.distill.teacher import teacher_topk

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    teacher = tiny_model("llama").model
    with torch.no_grad():
        teacher.lm_head.weight[4, 1] = float("nan")
    with pytest.raises(ShrinkError, match="teacher's logits are NaN or infinite on sequences 0-3") as err:
        teacher_topk(teacher, IDS, k=8)
    _one_sentence(err.value)
    assert not list((tmp_path / "teacher").glob("*.safetensors"))


def test_a_nan_loss_stops_at_its_step_in_one_sentence(tiny_model, tmp_path):
    from shrink.compress.distill.trainer import DistillConfig, distill

    teacher, student = tiny_model("llama").model, tiny_model("llama").model
    with torch.no_grad():
        logp = torch.log_softmax(teacher(IDS).logits, -1).topk(8, -1)
        student.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ShrinkError, match="diverged at step 1 \\(loss nan") as err:
        distill(student, IDS, (logp.values, logp.indices.int()), DistillConfig(steps=3, batch_size=2, top_k=8),
                tmp_path / "out")
    _one_sentence(err.value)
