"""GraniteMoeHybrid to GGUF (llama.cpp's `granitehybrid`): the host of a Puzzle child with Mamba2 mixers.
A Llama rewritten as GraniteMoeHybrid with some layers Mamba2 runs in llama.cpp with the PyTorch model's
logits; what llama.cpp cannot hold is refused."""

import pytest
import torch

from shrink.compress.puzzle.granite import ATTENTION, MAMBA, granite_config, granite_from_llama
from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.runtimes import LlamaCppRunner, TorchRunner
from shrink.export.verify import compare
from shrink.families import spec_from_config, spec_from_model
from shrink.model import LoadedModel
from test_gguf_nemotron_h import IDS, TOLERANCE
from tiny_models import build, peaked


def granite(layer_types) -> LoadedModel:
    """A tiny Llama as GraniteMoeHybrid, its Mamba layers made to use their state (as tests/test_gguf_nemotron_h
    does: time steps 0.2-1, a conv that passes signal, A, D and the gated norm away from their initial values)."""
    model = granite_from_llama(build("llama", num_hidden_layers=len(layer_types)), layer_types)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("dt_bias"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 - 1.5)
            elif name.endswith(("conv1d.weight", "conv1d.bias")):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith(("A_log", "D", "mamba.norm.weight")):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    peaked(model)
    return LoadedModel(model, None, spec_from_model(model), "tiny-granite")


def test_a_hybrid_of_mamba2_and_attention_matches_pytorch_in_llama_cpp(tmp_path):
    loaded = granite([MAMBA, ATTENTION, MAMBA])
    assert [type(layer.mixer).__name__ for layer in loaded.spec.layers] == ["SSMSpec", "AttentionSpec", "SSMSpec"]
    report = export_gguf(loaded, tmp_path / "g.gguf", quant="f32")
    assert report.arch == "granitehybrid"
    meta = {k.split(".", 1)[1]: v for k, v in metadata_of(tmp_path / "g.gguf").items()}
    assert meta["attention.head_count_kv"] == [0, 2, 0]  # 0: a Mamba2 layer
    assert (meta["ssm.inner_size"], meta["ssm.time_step_rank"], meta["ssm.group_count"]) == (64, 4, 1)
    assert TorchRunner(loaded.model).logits(IDS[0]).std() > 1.0  # spread logits: agreement is not on noise
    metrics = compare(TorchRunner(loaded.model), LlamaCppRunner(tmp_path / "g.gguf", 64), IDS)
    print(f"GraniteMoeHybrid (Mamba2, attention, Mamba2) f32 in llama.cpp: max |logit difference| "
          f"{metrics.max_abs_logit_diff:.2e} over {metrics.positions} positions")
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < TOLERANCE
    # the Mamba layers matter at this tolerance: without the last one's output, PyTorch is far away
    with torch.no_grad():
        loaded.model.model.layers[2].mamba.out_proj.weight.zero_()
    assert compare(TorchRunner(loaded.model), LlamaCppRunner(tmp_path / "g.gguf", 64), IDS).max_abs_logit_diff > 50 * TOLERANCE


def test_an_all_attention_granite_is_the_llama_it_came_from_in_llama_cpp(tmp_path):
    llama = peaked(build("llama", num_hidden_layers=2))
    model = granite_from_llama(llama)
    report = export_gguf(LoadedModel(model, None, spec_from_model(model), "tiny-granite"), tmp_path / "g.gguf", quant="f32")
    assert report.arch == "granite"  # no Mamba2 layer: llama.cpp's plain granite, as its converter decides
    metrics = compare(TorchRunner(llama), LlamaCppRunner(tmp_path / "g.gguf", 64), IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < TOLERANCE


def test_what_granitehybrid_cannot_hold_is_refused(tmp_path):
    config = granite_config(build("llama").config, [MAMBA, ATTENTION])
    config.num_local_experts = 4
    with pytest.raises(ShrinkError, match="experts"):
        spec_from_config(config)
    wide = granite([MAMBA, ATTENTION])
    wide.model.config.mamba_expand = 4
    from dataclasses import replace

    spec = wide.spec
    ssm = replace(spec.layers[0].mixer, head_dim=2 * spec.layers[0].mixer.head_dim)
    with pytest.raises(ShrinkError, match="twice as wide"):
        export_gguf(replace(wide, spec=replace(spec, layers=(replace(spec.layers[0], mixer=ssm), spec.layers[1]))),
                    tmp_path / "w.gguf", quant="f32")
    assert not (tmp_path / "w.gguf").exists()


def metadata_of(path) -> dict:
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(str(path)).fields.items()
            if name.startswith("granitehybrid.")}
