"""SwiftKV's SingleInputKV on tiny random models: the transformed model against a straightforward
reference forward written here, the norm conventions of Llama and Gemma 3, cached decoding, saving and
reloading, composition with cross-layer sharing, the first training stage, the roofline's shorter
prefill (against a hand computation), the recipe step and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, Formats, LayerSpec
from shrink.compress.kvshare import share_kv
from shrink.compress.swiftkv import (
    freeze_for_stage_one,
    single_input_kv,
    stage_one_parameters,
)
from shrink.errors import ShrinkError
from shrink.hardware.ops import pass_ops, prefill_ops
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from tiny_models import reference_llama

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def _ids(n=2, seq=10, seed=0):
    return torch.randint(0, 100, (n, seq), generator=torch.Generator().manual_seed(seed))


def _perturb_norm(loaded, seed=1):
    """Give the SingleInputKV norm weights of its own, so a forward that ignored it would show."""
    norm = next(block.input_layernorm.kv_norm for block in loaded.model.model.layers
                if hasattr(block.input_layernorm, "kv_norm"))
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return norm


def test_llama_matches_the_reference_forward(tiny_model):
    loaded = tiny_model("llama", num_hidden_layers=4)
    ids = _ids()
    swift = single_input_kv(loaded, 2)
    norm = _perturb_norm(swift)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, reference_llama(loaded.model, ids), atol=1e-5)
        expected = reference_llama(swift.model, ids, k=2, kv_weight=norm.weight)
        assert torch.allclose(swift.model(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(loaded.model(ids).logits, expected, atol=1e-3)  # the transform changed the model
        # a reference that took layer 2's own input norm for the K/V input is told apart
        wrong = reference_llama(swift.model, ids, k=2, kv_weight=swift.model.model.layers[2].input_layernorm.weight)
        assert not torch.allclose(swift.model(ids).logits, wrong, atol=1e-3)
    assert swift.spec.single_input_kv == 2 and loaded.spec.single_input_kv is None
    assert sum(p.numel() for p in swift.model.parameters()) == swift.spec.param_counts().total
    assert swift.spec.param_counts().total == loaded.spec.param_counts().total + loaded.spec.hidden_size


def test_initialisation_leaves_layer_k_as_it_was(tiny_model):
    """The new norm starts as layer k's input norm and the projections as each layer's own, so with k
    the last layer (the only one whose K/V input changes is layer k itself) the logits are the original's."""
    for family, layers in (("llama", 4), ("gemma3", 6)):
        loaded = tiny_model(family, num_hidden_layers=layers)
        with torch.no_grad():
            last = single_input_kv(loaded, loaded.spec.num_layers - 1)
            assert torch.equal(last.model(_ids()).logits, loaded.model(_ids()).logits)
            assert not torch.allclose(single_input_kv(loaded, 1).model(_ids()).logits, loaded.model(_ids()).logits,
                                      atol=1e-4)


@pytest.mark.parametrize("family,offset", [("llama", 0.0), ("gemma3", 1.0)])
def test_keys_and_values_read_the_norm_of_layer_k_input(tiny_model, family, offset):
    """What reaches a later layer's k_proj and v_proj is (offset + w) * x / rms(x), x the stream entering
    layer k: Llama scales by w, Gemma 3 by 1 + w (its zero-centred weights)."""
    loaded = tiny_model(family, num_hidden_layers=4 if family == "llama" else 6)
    k = 2
    swift = single_input_kv(loaded, k)
    norm = _perturb_norm(swift)
    seen = {}
    layers = swift.model.model.layers
    hooks = [getattr(layers[j].self_attn, name).register_forward_hook(
        lambda _m, args, _out, key=(j, name): seen.__setitem__(key, args[0]))
        for j in (k, len(layers) - 1) for name in ("k_proj", "v_proj")]
    with torch.no_grad():
        x = swift.model(_ids(), output_hidden_states=True).hidden_states[k]  # the stream entering layer k
    for hook in hooks:
        hook.remove()
    eps = swift.model.config.rms_norm_eps
    by_hand = (offset + norm.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    assert len(seen) == 4 and all(torch.allclose(t, by_hand, atol=1e-5) for t in seen.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_and_reloading_keep_the_logits(tiny_model, family, tmp_path):
    from shrink.model import load, load_spec, save
    from transformers import DynamicCache

    loaded = tiny_model(family)
    swift = single_input_kv(loaded, loaded.spec.num_layers // 2)
    _perturb_norm(swift)
    ids = _ids(n=1, seq=14)
    with torch.no_grad():
        full = swift.model(ids).logits
        cache = DynamicCache(config=swift.model.config)
        steps = [swift.model(ids[:, :6], cache=cache, use_cache=True).logits]
        steps += [swift.model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(6, 14)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        path = save(swift.model, tmp_path / "swift")
        reloaded = load(str(path))
        assert torch.equal(reloaded.model(ids).logits, full)
    assert reloaded.spec.single_input_kv == swift.spec.single_input_kv
    assert reloaded.spec.layers == swift.spec.layers
    assert load_spec(str(path)).single_input_kv == swift.spec.single_input_kv  # from the config alone
    assert json.loads((path / "config.json").read_text())["shrink_single_input_kv"] == swift.spec.single_input_kv


def test_composes_with_cross_layer_sharing_in_either_order(tiny_model, tmp_path):
    from shrink.model import load, save

    loaded = tiny_model("llama", num_hidden_layers=4)
    ids = _ids()
    # owner 2 reads the shared K/V input, consumer 3 its keys; owner 0 its own input, consumer 1 its keys
    after = single_input_kv(share_kv(loaded, [[0, 1], [2, 3]], init="owner"), 2)
    before = share_kv(single_input_kv(loaded, 2), [[0, 1], [2, 3]], init="owner")
    # a group across k: consumer 2 reads owner 1's keys, computed from layer 1's own input
    across = single_input_kv(share_kv(loaded, [[1, 2]], init="owner"), 2)
    with torch.no_grad():
        for model, sources in ((after, {1: 0, 3: 2}), (before, {1: 0, 3: 2}), (across, {2: 1})):
            norm = _perturb_norm(model)
            expected = reference_llama(model.model, ids, k=2, kv_weight=norm.weight, sources=sources)
            assert torch.allclose(model.model(ids).logits, expected, atol=1e-5)
            assert model.spec.single_input_kv == 2
            assert [l.mixer.kv_source for l in model.spec.layers] == [sources.get(i) for i in range(4)]
        reloaded = load(str(save(before.model, tmp_path / "both")))
        assert torch.equal(reloaded.model(ids).logits, before.model(ids).logits)
    assert sum(p.numel() for p in before.model.parameters()) == before.spec.param_counts().total


# Gemma 3 with layers sliding over 8 tokens: the 20-token prompts below go past the window
GEMMA_SLIDING = {"num_hidden_layers": 6, "sliding_window": 8,
                 "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_prefill_stops_the_prompt_at_layer_k(tiny_model, family):
    """SwiftKV's prefill schedule: under last_token_prefill the layers from k on see one token, yet the
    last logits and every layer's cached K/V equal the full forward's, and decoding from that cache
    (one token or a chunk) continues exactly."""
    from shrink.blockvariants import last_token_prefill
    from transformers import DynamicCache

    loaded = tiny_model(family, **(GEMMA_SLIDING if family == "gemma3" else {}))
    k = loaded.spec.num_layers // 2
    swift = single_input_kv(loaded, k)
    _perturb_norm(swift)
    ids = _ids(n=1, seq=20)
    layers = swift.model.model.layers
    seen = []
    hooks = [block.mlp.register_forward_hook(lambda _m, args, _o, i=i: seen.append((i, args[0].shape[1])))
             for i, block in enumerate(layers)]
    with torch.no_grad():
        full_cache = DynamicCache(config=swift.model.config)
        full = swift.model(ids, cache=full_cache, use_cache=True).logits
        seen.clear()
        cache = DynamicCache(config=swift.model.config)
        with last_token_prefill(swift.model) as at:
            prefill = swift.model(ids[:, :16], cache=cache, use_cache=True).logits
        assert at == k and prefill.shape[1] == 1
        assert seen == [(i, 16 if i < k else 1) for i in range(len(layers))]
        for hook in hooks:
            hook.remove()
        assert torch.allclose(prefill[:, -1], full[:, 15], atol=1e-5)
        with last_token_prefill(swift.model):  # a chunk after a past, then one token
            chunk = swift.model(ids[:, 16:19], cache=cache, use_cache=True).logits
            step = swift.model(ids[:, 19:], cache=cache, use_cache=True).logits
        assert torch.allclose(chunk[:, -1], full[:, 18], atol=1e-5) and torch.allclose(step[:, -1], full[:, 19], atol=1e-5)
        for i in range(len(layers)):
            assert torch.allclose(cache.layers[i].keys, full_cache.layers[i].keys, atol=1e-5)
            assert torch.allclose(cache.layers[i].values, full_cache.layers[i].values, atol=1e-5)
        with last_token_prefill(loaded.model) as none:  # no SingleInputKV: nothing changes
            assert none is None and loaded.model(ids).logits.shape[1] == 20
    assert all(getattr(block.self_attn, "kv_rope", None) is None for block in layers)  # nothing held after


def test_last_token_prefill_with_a_shared_cache_across_k(tiny_model):
    """A consumer at or after k of an owner before k attends to the owner's keys of every position."""
    from shrink.blockvariants import last_token_prefill

    loaded = tiny_model("llama", num_hidden_layers=4)
    model = single_input_kv(share_kv(loaded, [[1, 2]], init="owner"), 2)
    _perturb_norm(model)
    ids = _ids(n=1, seq=12)
    with torch.no_grad():
        full = model.model(ids).logits
        with last_token_prefill(model.model):
            last = model.model(ids).logits
    assert torch.allclose(last[:, -1], full[:, -1], atol=1e-5)


def test_stage_one_trains_only_the_new_norm_and_the_later_attention(tiny_model, tmp_path):
    from shrink.compress.distill.teacher import teacher_topk
    from shrink.compress.distill.trainer import DistillConfig, distill
    from tiny_models import peaked

    loaded = tiny_model("qwen3", num_hidden_layers=4, layer_types=["full_attention"] * 4)
    peaked(loaded.model)  # spread logits: a KL that is a real distance, not ~0 by construction
    swift = single_input_kv(loaded, 2)
    names = {id(p): n for n, p in swift.model.named_parameters()}
    trained = sorted(names[id(p)] for p in stage_one_parameters(swift.model))
    expected = sorted(["model.layers.2.input_layernorm.kv_norm.weight"] +
                      [f"model.layers.{i}.self_attn.{m}.weight" for i in (2, 3)
                       for m in ("q_proj", "k_proj", "v_proj", "k_norm", "q_norm")])
    assert trained == expected
    assert len(stage_one_parameters(swift.model, queries=False)) == 1 + 2 * 3
    count = freeze_for_stage_one(swift.model)
    assert count == sum(p.numel() for p in swift.model.parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in swift.model.named_parameters()}
    train = torch.randint(0, 100, (16, 12), generator=torch.Generator().manual_seed(3))
    topk = teacher_topk(loaded.model, train, 16)
    report = distill(swift.model, train, topk, DistillConfig(steps=20, lr=1e-3, batch_size=4, top_k=16,
                                                             checkpoint_every=100),
                     tmp_path / "ckpt", evaluation=train, eval_topk=topk)
    changed = {n for n, p in swift.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(expected)
    assert report.eval_after["kl"] < report.eval_before["kl"]


def test_refusals(tiny_model):
    llama = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(ShrinkError, match="written for llama, mistral, qwen2, qwen3, gemma3, not 'nemotron_h'"):
        single_input_kv(tiny_model("nemotron_h-dense"), 2)
    for k in (0, 4, -1, True):
        with pytest.raises(ShrinkError, match="k is a layer index from 1 to 3"):
            single_input_kv(llama, k)
    with pytest.raises(ShrinkError, match="already takes its K/V from layer 2"):
        single_input_kv(single_input_kv(llama, 2), 3)
    with pytest.raises(ShrinkError, match="no SingleInputKV norm"):
        stage_one_parameters(llama.model)


def _hand_spec(k=None):
    # fp16 throughout: 2 bytes per element; h 64, 4 heads of 16, 2 KV heads, FFN 128, vocab 1000
    attention = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16)
    layer = LayerSpec(mixer=attention, ffn=FFNSpec(kind="gated", width=128), norms=2)
    fp16 = Formats(weights="fp16", embeddings="fp16", activations="fp16", kv_cache="fp16", other="fp16")
    return ArchSpec(family="llama", vocab_size=1000, hidden_size=64, tied_embeddings=False, layers=(layer,) * 4,
                    formats=fp16, single_input_kv=k)


def test_prefill_costs_match_a_hand_computation():
    h, q, kv, f, v, T = 64, 64, 32, 128, 1000, 100

    def layer_flops(new, past):  # norms, qkv, sdpa, o, gated FFN for `new` tokens after `past`
        seen = new * past + new * (new + 1) // 2
        return (4 * new * h * 2 + 2 * new * h * (q + 2 * kv) + seen * 4 * (4 * 16 + 5) + 2 * new * q * h
                + 2 * new * h * 2 * f + 2 * new * f * h)

    edges = T * h + 4 * h + 2 * h * v  # embedding of T tokens, final norm and lm_head of the last
    full = 4 * layer_flops(T, 0) + edges
    # k = 2: the prompt through layers 0 and 1; the norm of layer 2's input for all T tokens; layers 2
    # and 3 project keys and values for the first T-1 tokens, then run the last token in full
    swift = 2 * layer_flops(T, 0) + 4 * T * h + 2 * (2 * (T - 1) * h * 2 * kv) + 2 * layer_flops(1, T - 1) + edges
    assert sum(op.flops for op in prefill_ops(_hand_spec(), 1, T)) == full
    assert sum(op.flops for op in prefill_ops(_hand_spec(2), 1, T)) == swift
    # KV cache writes: every layer's T positions either way (T-1 in the fill, 1 in the last token's pass)
    fill = [op for op in prefill_ops(_hand_spec(2), 1, T) if op.name == "attn.kv"]
    assert len(fill) == 2 and fill[0].bytes == h * 2 * kv * 2 + (T - 1) * (h + 2 * kv) * 2 + (T - 1) * 2 * kv * 2
    # decoding runs every layer as before, plus the norm of layer k's input for the new token
    decode, swift_decode = (sum(op.flops for op in pass_ops(_hand_spec(k), 1, 1, T)) for k in (None, 2))
    assert swift_decode == decode + 4 * h


def test_estimate_shows_the_shorter_time_to_first_token(tiny_model, tmp_path):
    from shrink.cli.app import app
    from shrink.model import save
    from typer.testing import CliRunner

    profile, workload = get_profile("jetson-orin-nano"), Workload(prompt_len=2048, gen_len=16)
    plain, swift = (estimate(_hand_spec(k), profile, workload) for k in (None, 2))
    assert swift.ttft_s < 0.6 * plain.ttft_s
    assert swift.memory.kv_cache_bytes == plain.memory.kv_cache_bytes
    assert swift.tpot_s == pytest.approx(plain.tpot_s, rel=1e-3)
    assert ArchSpec.from_dict(json.loads(_hand_spec(2).to_json())) == _hand_spec(2)
    with pytest.raises(ShrinkError, match="single_input_kv is a layer index below 4"):
        ArchSpec.from_dict({**_hand_spec().to_dict(), "single_input_kv": 4})
    with pytest.raises(ShrinkError, match="single_input_kv must be a non-negative"):
        ArchSpec.from_dict({**_hand_spec().to_dict(), "single_input_kv": "2"})

    loaded = tiny_model("llama", num_hidden_layers=4)
    directories = {"plain": save(loaded.model, tmp_path / "plain"),
                   "swift": save(single_input_kv(loaded, 2).model, tmp_path / "swift")}
    ttft = {}
    for name, path in directories.items():
        result = CliRunner().invoke(app, ["estimate", str(path), "-t", "jetson-orin-nano", "--prompt-len", "2048",
                                          "--json"])
        assert result.exit_code == 0, result.output
        ttft[name] = json.loads(result.stdout)["estimates"][0]["ttft_s"]
    assert ttft["swift"] < 0.75 * ttft["plain"]


def test_single_input_kv_recipe_step(tiny_text_model_dir, tmp_path, monkeypatch):
    from shrink.flows.recipe import SingleInputKVStep, parse_recipe
    from shrink.flows.run import run_recipe
    from shrink.model import load

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[step]]\nname = "single-input-kv"\nk = 2\ntokens = 1024\nlr = 0.001\n')
    steps = parse_recipe(recipe)
    assert steps == [("single-input-kv", SingleInputKVStep(k=2, tokens=1024, lr=1e-3))]
    report = run_recipe(str(model_dir), steps, tmp_path / "run", data=str(text), seq_len=16)
    metrics = report["steps"][0]["metrics"]
    assert metrics["k"] == 2 and metrics["ttft_s_estimated"]["after"] < metrics["ttft_s_estimated"]["before"]
    stage = metrics["stage_one"]
    assert stage["eval_before"]["kl"] == pytest.approx(metrics["held_out_after_transform"]["kl"], rel=1e-6)
    assert stage["eval_after"]["kl"] < stage["eval_before"]["kl"]
    final = load(report["final"]["model"])
    assert final.spec.single_input_kv == 2
    assert all(p.requires_grad for p in final.model.parameters())
    recipe.write_text('[[step]]\nname = "single-input-kv"\nk = "2"\n')
    with pytest.raises(ShrinkError, match="'k' of step 'single-input-kv' must be"):
        parse_recipe(recipe)


def test_gguf_is_refused_for_single_input_kv_before_anything_is_written(tiny_model, tmp_path):
    from shrink.export.gguf import export_gguf
    from shrink.flows.preflight import refuse_early
    from shrink.flows.recipe import ExportStep, SingleInputKVStep

    swift = single_input_kv(tiny_model("llama", num_hidden_layers=4), 2)
    with pytest.raises(ShrinkError, match="take them from layer 2's input .* cannot be a GGUF"):
        export_gguf(swift, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()
    from shrink.model import save

    saved = str(save(tiny_model("llama", num_hidden_layers=4).model, tmp_path / "plain"))
    with pytest.raises(ShrinkError, match="SingleInputKV"):
        refuse_early(saved, [("single-input-kv", SingleInputKVStep(k=2)), ("export", ExportStep(format="gguf"))])
    refuse_early(saved, [("single-input-kv", SingleInputKVStep(k=2)), ("export", ExportStep(format="onnx"))])
