"""Pruning slices for real, and the pruned model equals the full model with the same units masked."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from shrink import blocks
from shrink.compress.importance import score
from shrink.compress.prune import prune_ffn, prune_heads, prune_kv_groups, prune_layers, prune_ssm
from shrink.errors import ShrinkError
from shrink.model import load, save
from tiny_models import NEMOTRON_DENSE

# Nemotron-H as SSM, MLP, attention, MLP, SSM blocks: pruning refuses its MoE block
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3", "mistral", "nemotron_h-dense"]
CALIBRATION = torch.randint(0, 101, (6, 24), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(2))


def logits(model, ids=PROBE):
    with torch.no_grad():
        return model(ids).logits


def masked(loaded, mask_fn):
    """The full model with some units zeroed in place of removing them."""
    import copy

    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        mask_fn(model)
    return model


def dropped(scores, keep):
    return sorted(set(range(len(scores))) - set(torch.topk(scores, keep).indices.tolist()))


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_pruning_equals_masking(tiny_model, family):
    loaded = tiny_model(family)
    imp = score(loaded, CALIBRATION)
    pruned = prune_ffn(loaded, imp, 20)
    widths = [layer.ffn.width for layer in pruned.spec.layers if layer.ffn is not None]
    assert widths == [20] * len([s for s in imp.ffn if s is not None])
    assert all(blocks.mlp(b).up_proj.weight.shape == (20, 32) for b in pruned.model.model.layers if blocks.mlp(b))

    def mask(model):
        for block, scores in zip(model.model.layers, imp.ffn):
            if scores is not None:
                blocks.mlp(block).down_proj.weight[:, dropped(scores, 20)] = 0

    assert torch.allclose(logits(pruned.model), logits(masked(loaded, mask)), atol=1e-5)
    assert sum(p.numel() for p in pruned.model.parameters()) == pruned.spec.param_counts().total


@pytest.mark.parametrize("family", FAMILIES)
def test_head_pruning_within_kv_groups_equals_masking(tiny_model, family):
    loaded = tiny_model(family)  # 4 query heads in 2 KV groups
    imp = score(loaded, CALIBRATION)
    pruned = prune_heads(loaded, imp, heads_per_group=1)
    a = next(layer.mixer for layer in pruned.spec.layers if hasattr(layer.mixer, "num_kv_heads"))
    assert (a.num_heads, a.num_kv_heads) == (2, 2)
    head_dim = a.head_dim

    def mask(model):
        for block, scores in zip(model.model.layers, imp.heads):
            for g in range(2 if scores is not None else 0):
                for h in dropped(scores[2 * g:2 * g + 2], 1):
                    col = (2 * g + h) * head_dim
                    blocks.attention(block).o_proj.weight[:, col:col + head_dim] = 0

    assert torch.allclose(logits(pruned.model), logits(masked(loaded, mask)), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_kv_group_pruning_equals_masking(tiny_model, family):
    loaded = tiny_model(family)
    imp = score(loaded, CALIBRATION)
    pruned = prune_kv_groups(loaded, imp, groups=1)
    assert pruned.spec.layers[0].mixer.num_kv_heads == 1 and pruned.spec.layers[0].mixer.num_heads == 2
    head_dim = pruned.spec.layers[0].mixer.head_dim

    def mask(model):
        for i, block in enumerate(model.model.layers):
            for g in dropped(imp.kv_groups(i, 2), 1):
                block.self_attn.o_proj.weight[:, g * 2 * head_dim:(g + 1) * 2 * head_dim] = 0

    assert torch.allclose(logits(pruned.model), logits(masked(loaded, mask)), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "nemotron_h-dense"])
def test_depth_pruning_equals_skipping_the_layers(tiny_model, family):
    loaded = tiny_model(family)
    imp = score(loaded, CALIBRATION)
    keep = loaded.spec.num_layers - 1
    pruned = prune_layers(loaded, imp, keep)
    assert pruned.spec.num_layers == keep
    skipped = set(dropped(imp.layers, keep))
    reference = masked(loaded, lambda model: None)
    for i in skipped:
        reference.model.layers[i].register_forward_hook(lambda module, args, output: args[0])
    assert torch.allclose(logits(pruned.model), logits(reference), atol=1e-5)


def test_uniformly_pruned_model_saves_and_reloads_identically(tiny_model, tmp_path):
    loaded = tiny_model("gemma3")
    imp = score(loaded, CALIBRATION)
    pruned = prune_layers(prune_heads(prune_ffn(loaded, imp, 16), imp, 1), imp, 4)
    save(pruned.model, tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert torch.equal(logits(pruned.model), logits(again))
    assert pruned.spec.param_counts().total < loaded.spec.param_counts().total


def test_block_influence_ranks_an_identity_layer_last(tiny_model):
    loaded = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        loaded.model.model.layers[1].self_attn.o_proj.weight.zero_()
        loaded.model.model.layers[1].mlp.down_proj.weight.zero_()
    imp = score(loaded, CALIBRATION)
    assert imp.layers[1] == pytest.approx(0, abs=1e-6) and int(imp.layers.argmin()) == 1


def test_impossible_targets_are_refused(tiny_model):
    loaded = tiny_model("llama")
    imp = score(loaded, CALIBRATION)
    with pytest.raises(ShrinkError, match="between 1 and 48"):
        prune_ffn(loaded, imp, 64)
    with pytest.raises(ShrinkError, match="between 1 and 2"):
        prune_heads(loaded, imp, 3)
    with pytest.raises(ShrinkError, match="MoE"):
        score(tiny_model("nemotron_h", layers_block_type=NEMOTRON_DENSE[:3] + ["moe"]), CALIBRATION)
    with pytest.raises(ShrinkError, match="no SSM"):
        prune_ssm(loaded, imp, heads_per_group=1)
    nemotron = tiny_model("nemotron_h-dense")
    with pytest.raises(ShrinkError, match="between 1 and 4"):  # 8 SSM heads in 2 groups
        prune_ssm(nemotron, score(nemotron, CALIBRATION), heads_per_group=5)


@pytest.mark.slow
def test_prune_command_on_the_embedded_model_then_gguf_export(tmp_path):
    import json

    from typer.testing import CliRunner

    from shrink.cli.app import app
    from shrink.export.prompts import DEFAULT_TEXTS
    from shrink.model import load

    data = tmp_path / "calibration.txt"
    data.write_text("\n\n".join(DEFAULT_TEXTS * 4))
    runner = CliRunner()
    result = runner.invoke(app, ["prune", "gemma-3-270m", "--ffn", "1024", "--heads", "2", "--data", str(data),
                                 "--seq-len", "32", "-o", str(tmp_path / "pruned"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # Gemma 3 270M: 268,098,176 parameters; each of its 18 layers loses 3 x 640 x 1024 FFN weights and
    # 2 query heads of 256 (640 x 512 in q_proj, 512 x 640 in o_proj): 18 x (1,966,080 + 655,360) = 47,185,920
    assert (report["params_before"], report["params_after"]) == (268_098_176, 268_098_176 - 47_185_920)
    pruned = load(str(tmp_path / "pruned"))
    assert pruned.spec.layers[0].ffn.width == 1024 and pruned.spec.layers[0].mixer.num_heads == 2
    assert sum(p.numel() for p in pruned.model.parameters()) == report["params_after"]  # the saved tensors
    assert pruned.gguf_tokenizer is not None  # the tokenizer travels, so GGUF export still works
    result = runner.invoke(app, ["export", str(tmp_path / "pruned"), "-f", "gguf", "--quant", "f16",
                                 "-o", str(tmp_path / "pruned.gguf"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verify"]["metrics"]["top1_agreement"] >= 0.99


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_pruning_equals_masking(tiny_model, family, tmp_path):
    from shrink.compress.prune import prune_hidden

    loaded = tiny_model(family)
    imp = score(loaded, CALIBRATION)
    pruned = prune_hidden(loaded, imp, 24)
    assert pruned.spec.hidden_size == 24
    drop = dropped(imp.hidden, 24)

    def mask(model):  # hold the dropped channels of the residual stream at zero
        blocks.embedding(model).weight[:, drop] = 0
        for block in model.model.layers:
            for writer in (blocks.attention(block), blocks.mlp(block), blocks.ssm(block)):
                if writer is not None:
                    projection = getattr(writer, "o_proj", None) or getattr(writer, "down_proj", None) or writer.out_proj
                    projection.weight[drop, :] = 0

    reference = masked(loaded, mask)
    assert torch.allclose(logits(pruned.model), logits(reference), atol=1e-4, rtol=1e-4)
    save(pruned.model, tmp_path / "h")
    again = load(str(tmp_path / "h")).model  # Nemotron's gated norm keeps its own epsilon through the save
    assert torch.allclose(logits(again), logits(pruned.model), atol=1e-6)


def test_layer_kl_ranks_an_identity_layer_last_and_agrees_with_block_influence(tiny_model):
    from shrink.compress.importance import layer_kl_scores

    loaded = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        loaded.model.model.layers[1].self_attn.o_proj.weight.zero_()
        loaded.model.model.layers[1].mlp.down_proj.weight.zero_()
    kl = layer_kl_scores(loaded, CALIBRATION)
    assert kl[1] == pytest.approx(0, abs=1e-9) and kl[0] > 0 and kl[2] > 0


def test_importance_is_cached_and_reused(tiny_model, tmp_path, monkeypatch):
    from shrink.compress import importance as module

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    loaded = tiny_model("qwen3")
    first = module.cached_score(loaded, CALIBRATION)
    assert len(list((tmp_path / "importance").glob("*.pt"))) == 1
    monkeypatch.setattr(module, "score", lambda *a, **k: pytest.fail("scored again instead of reading the cache"))
    again = module.cached_score(loaded, CALIBRATION)
    assert torch.equal(again.hidden, first.hidden) and all(torch.equal(a, b) for a, b in zip(again.ffn, first.ffn))


def ssm_mask(imp, layers, heads_per_group, head_dim, num_heads=8, num_groups=2, full_head_dim=8):
    """Zero the dropped SSM channels where they enter the gated norm (the scan output)."""
    per_group = num_heads // num_groups
    channels = torch.topk(imp.ssm_channels(), head_dim).indices

    def mask(model):
        for i in layers:
            scores = imp.ssm_heads(i)
            keep = torch.zeros(num_heads, full_head_dim)
            for g in range(num_groups):
                for h in torch.topk(scores[g * per_group:(g + 1) * per_group], heads_per_group).indices:
                    keep[g * per_group + h, channels] = 1
            blocks.ssm(model.model.layers[i]).norm.register_forward_pre_hook(
                lambda _m, args, keep=keep.flatten(): (args[0] * keep,) + args[1:])
    return mask


@pytest.mark.parametrize("heads_per_group,head_dim", [(2, 8), (4, 5), (1, 3)])
def test_group_aware_ssm_pruning_equals_masking(tiny_model, heads_per_group, head_dim, tmp_path):
    loaded = tiny_model("nemotron_h-dense")  # SSM layers 0 and 4: 8 heads of 8 channels in 2 groups
    imp = score(loaded, CALIBRATION)
    pruned = prune_ssm(loaded, imp, heads_per_group=heads_per_group, head_dim=head_dim)
    ssm = pruned.spec.layers[0].mixer
    assert (ssm.num_heads, ssm.head_dim, ssm.num_groups) == (2 * heads_per_group, head_dim, 2)
    mixer = pruned.model.model.layers[4].mixer
    assert mixer.out_proj.weight.shape == (32, 2 * heads_per_group * head_dim)
    assert mixer.A_log.shape == (2 * heads_per_group,)
    assert sum(p.numel() for p in pruned.model.parameters()) == pruned.spec.param_counts().total
    reference = masked(loaded, ssm_mask(imp, (0, 4), heads_per_group, head_dim))
    assert torch.allclose(logits(pruned.model), logits(reference), atol=1e-5)
    assert not torch.allclose(logits(pruned.model), logits(loaded.model), atol=1e-3)  # the mask mattered
    save(pruned.model, tmp_path / "ssm")
    again = load(str(tmp_path / "ssm"))
    assert again.spec.layers[4].mixer == ssm
    assert torch.allclose(logits(again.model), logits(pruned.model), atol=1e-6)


def test_ssm_heads_are_kept_in_equal_numbers_per_group(tiny_model):
    loaded = tiny_model("nemotron_h-dense")
    imp = score(loaded, CALIBRATION)
    with torch.no_grad():  # make group 0's heads all outrank group 1's
        imp.ssm[0][:4] += 100
    pruned = prune_ssm(loaded, imp, heads_per_group=2)
    kept_a = pruned.model.model.layers[0].mixer.A_log
    full_a = loaded.model.model.layers[0].mixer.A_log
    kept = [int((full_a == a).nonzero()[0]) for a in kept_a]
    assert sum(h < 4 for h in kept) == 2 and sum(h >= 4 for h in kept) == 2


@pytest.mark.parametrize("family", ["llama", "nemotron_h-dense"])
def test_per_layer_widths_make_a_non_uniform_model_that_equals_masking_and_reloads(tiny_model, family, tmp_path):
    loaded = tiny_model(family)
    imp = score(loaded, CALIBRATION)
    ffn_layers = [i for i, s in enumerate(imp.ffn) if s is not None]
    widths = [40, 12][:len(ffn_layers)]
    pruned = prune_ffn(loaded, imp, widths)
    assert [pruned.spec.layers[i].ffn.width for i in ffn_layers] == widths and not pruned.spec.is_uniform

    def mask(model):
        for i, width in zip(ffn_layers, widths):
            blocks.mlp(model.model.layers[i]).down_proj.weight[:, dropped(imp.ffn[i], width)] = 0

    assert torch.allclose(logits(pruned.model), logits(masked(loaded, mask)), atol=1e-5)
    save(pruned.model, tmp_path / "nonuniform")
    again = load(str(tmp_path / "nonuniform"))
    assert [again.spec.layers[i].ffn.width for i in ffn_layers] == widths
    assert torch.equal(logits(again.model), logits(pruned.model))
    with pytest.raises(ShrinkError, match="per-layer values"):
        prune_ffn(loaded, imp, [8])
