"""Cross-layer KV sharing on tiny random models: the shared model against a straightforward reference
forward written here, cached decoding, saving and reloading, the choice of pairs and the refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shrink.compress.kvshare import choose_pairs, key_value_similarity, runs_of_kind, share_kv
from shrink.errors import ShrinkError
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from tiny_models import reference_llama


def _ids(n=2, seq=10, seed=0):
    return torch.randint(0, 100, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_shared_llama_matches_the_reference_forward(tiny_model):
    loaded = tiny_model("llama", num_hidden_layers=4)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, reference_llama(loaded.model, ids), atol=1e-5)
        shared = share_kv(loaded, [[0, 1], [2, 3]], init="owner")
        expected = reference_llama(loaded.model, ids, sources={1: 0, 3: 2})
        assert torch.allclose(shared.model(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(loaded.model(ids).logits, expected, atol=1e-3)  # sharing changed the model
    assert [l.mixer.kv_source for l in shared.spec.layers] == [None, 0, None, 2]
    params = sum(p.numel() for p in shared.model.parameters())
    assert params == shared.spec.param_counts().total < loaded.spec.param_counts().total


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_decoding_and_reloading_keep_the_logits(tiny_model, family, tmp_path):
    from transformers import DynamicCache

    from shrink.model import load, save

    loaded = tiny_model(family)
    groups = choose_pairs(loaded.spec, key_value_similarity(loaded, _ids(n=4)))
    shared = share_kv(loaded, groups)
    ids = _ids(n=1, seq=14)
    with torch.no_grad():
        full = shared.model(ids).logits
        cache = DynamicCache(config=shared.model.config)
        steps = [shared.model(ids[:, :6], cache=cache, use_cache=True).logits]
        steps += [shared.model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(6, 14)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        reloaded = load(str(save(shared.model, tmp_path / "shared")))
        assert torch.equal(reloaded.model(ids).logits, full)
    assert reloaded.spec.layers == shared.spec.layers


def test_pairs_stay_within_one_attention_kind_and_the_roofline_counts_owners_only(tiny_model):
    loaded = tiny_model("gemma3")  # sliding and global layers
    runs = runs_of_kind(loaded.spec)
    assert len(runs) == 2
    kind_of = {i: n for n, run in enumerate(runs) for i in run}
    similarity = key_value_similarity(loaded, _ids(n=4))
    groups = choose_pairs(loaded.spec, similarity)
    assert groups and all(kind_of[a] == kind_of[b] for a, b in groups)
    assert len({i for g in groups for i in g}) == 2 * len(groups)
    assert choose_pairs(loaded.spec, similarity, count=1) == [max(groups, key=lambda g: similarity[tuple(g)])]
    shared = share_kv(loaded, groups)
    workload = Workload(prompt_len=64, gen_len=8)
    before = estimate(loaded.spec, get_profile("jetson-orin-nano"), workload).memory.kv_cache_bytes
    after = estimate(shared.spec, get_profile("jetson-orin-nano"), workload).memory.kv_cache_bytes
    owners_only = replace(loaded.spec, layers=tuple(l for l, s in zip(loaded.spec.layers, shared.spec.layers)
                                                    if s.mixer.owns_kv))
    assert after == estimate(owners_only, get_profile("jetson-orin-nano"), workload).memory.kv_cache_bytes < before


def test_bad_groups_are_refused(tiny_model):
    loaded = tiny_model("gemma3")
    sliding, global_ = runs_of_kind(loaded.spec)
    with pytest.raises(ShrinkError, match="differ in sliding window"):
        share_kv(loaded, [[sliding[0], global_[0]]])
    with pytest.raises(ShrinkError, match="two KV-sharing groups"):
        share_kv(loaded, [[0, 1], [1, 2]])
    with pytest.raises(ShrinkError, match="two or more attention layers"):
        share_kv(loaded, [[0]])
    with pytest.raises(ShrinkError, match="only 2 pairs|Only"):
        choose_pairs(loaded.spec, key_value_similarity(loaded, _ids()), count=99)


def test_kv_share_recipe_step_shares_then_distillation_recovers(tiny_text_model_dir, tmp_path, monkeypatch):
    from shrink.flows.recipe import DistillStep, KVShareStep
    from shrink.flows.run import run_recipe
    from shrink.model import load

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    steps = [("kv-share", KVShareStep(pairs=1)), ("distill", DistillStep(tokens=1024, lr=1e-3))]
    report = run_recipe(str(model_dir), steps, tmp_path / "run", data=str(text), seq_len=16)
    shared, distilled = report["steps"][0]["metrics"], report["steps"][1]["metrics"]
    assert len(shared["groups"]) == 1
    assert shared["kv_cache_bytes_estimated"]["after"] == 0.75 * shared["kv_cache_bytes_estimated"]["before"]
    assert shared["held_out_after_sharing"]["kl"] > 0
    assert distilled["eval_after"]["kl"] < shared["held_out_after_sharing"]["kl"]
    final = load(report["final"]["model"])
    assert [layer.mixer.kv_source for layer in final.spec.layers].count(None) == 3
    with pytest.raises(ShrinkError, match="written like 0-1,2-3"):
        run_recipe(str(model_dir), [("kv-share", KVShareStep(groups="0+1"))], tmp_path / "bad", data=str(text), seq_len=16)


def test_kv_share_command(tiny_text_model_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from shrink.cli.app import app

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    args = ["kv-share", str(model_dir), "--data", str(text), "--seq-len", "16", "--json"]
    result = CliRunner().invoke(app, [*args, "--groups", "2-3", "--tokens", "0", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["groups"] == [[2, 3]] and report["held_out"]["kl"] > 0
    assert [layer["mixer"]["kv_source"] for layer in report["spec"]["layers"]] == [None, None, None, 2]
    bad = CliRunner().invoke(app, [*args, "--groups", "0-9", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "two or more attention layers" in bad.output and not (tmp_path / "bad").exists()


def test_nemotron_h_attention_layers_share_across_mamba_blocks(tiny_model, tmp_path):
    """Nemotron-H's attention (no RoPE) sits between Mamba and MLP blocks: its attention layers pair
    with each other across them, and the hybrid model decodes and reloads as before."""
    from shrink.model import load, save

    loaded = tiny_model("nemotron_h", layers_block_type=["full_attention", "linear_attention", "mlp",
                                                         "full_attention", "linear_attention"])
    groups = choose_pairs(loaded.spec, key_value_similarity(loaded, _ids(n=2)))
    assert groups == [[0, 3]]
    shared = share_kv(loaded, groups, init="owner")
    ids = _ids(n=1, seq=8)
    with torch.no_grad():
        full = shared.model(ids).logits
        assert not torch.allclose(full, loaded.model(ids).logits, atol=1e-4)
        reloaded = load(str(save(shared.model, tmp_path / "nemotron")))
        assert torch.equal(reloaded.model(ids).logits, full)
    assert shared.spec.layers[3].mixer.kv_source == 0 and reloaded.spec.layers == shared.spec.layers
