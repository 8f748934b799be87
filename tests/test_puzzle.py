"""Puzzle on tiny random models: variant initialisation, blockwise distillation, replace-one-block
scores, exact additive costs, the mixed-integer program against brute force, and assembly."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from shrink.compress.importance import score
from shrink.compress.puzzle import bld, library, scores, solve
from shrink.compress.puzzle.assemble import assemble
from shrink.compress.puzzle.library import Variant
from shrink.errors import ShrinkError
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate


def _ids(n=4, seq=16, seed=0):
    return torch.randint(0, 100, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_linear_attention_equals_attention_on_a_single_token(tiny_model, family):
    loaded = tiny_model(family)
    block = loaded.model.model.layers[1]
    module = library.build(block, loaded.spec.layers[1], Variant("attention", "linear"), 1)
    ids = _ids(n=2, seq=1)
    inputs, _ = bld.layer_inputs(loaded.model, ids)
    x, kwargs = inputs[1]
    with torch.no_grad():
        parent = bld.branch(block, "attention", block.self_attn, x, kwargs, 1)
        linear = bld.branch(block, "attention", module, x, kwargs, 1)
    assert torch.allclose(parent, linear, atol=1e-5), (parent - linear).abs().max()
    longer = bld.layer_inputs(loaded.model, _ids(n=2, seq=8))[0][1]
    with torch.no_grad():  # beyond one token the two differ: the check above could fail
        assert not torch.allclose(bld.branch(block, "attention", block.self_attn, *longer, 1),
                                  bld.branch(block, "attention", module, *longer, 1), atol=1e-3)


def test_pooled_kv_heads_are_the_mean_of_merged_heads(tiny_model):
    loaded = tiny_model("llama")  # 4 query heads over 2 KV heads
    block = loaded.model.model.layers[0]
    variants = [v.name for v in library.attention_variants(loaded.spec.layers[0])]
    assert variants == ["parent", "kv1", "linear", "none"]
    module = library.build(block, loaded.spec.layers[0], Variant("attention", "kv1"), 0)
    d = loaded.spec.layers[0].mixer.head_dim
    k = block.self_attn.k_proj.weight
    assert torch.allclose(module.k_proj.weight, (k[:d] + k[d:]) / 2)
    assert module.num_key_value_groups == 4


def test_narrow_ffn_keeps_the_largest_contributions(tiny_model):
    loaded = tiny_model("llama")
    importance = score(loaded, _ids(), batch_size=2)
    block = loaded.model.model.layers[0]
    module = library.build(block, loaded.spec.layers[0], Variant("ffn", "ffn50"), 0, importance.ffn[0])
    width = loaded.spec.layers[0].ffn.width
    assert module.up_proj.out_features == width // 2
    contribution = importance.ffn[0] * block.mlp.down_proj.weight.norm(dim=0)
    kept = {tuple(row.tolist()) for row in module.up_proj.weight}
    best = torch.topk(contribution, width // 2).indices
    assert kept == {tuple(block.mlp.up_proj.weight[i].tolist()) for i in best.tolist()}


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    loaded = tiny_model("gemma3")
    importance = score(loaded, _ids(), batch_size=2)
    lib = [[Variant("attention", n) for n in ("parent", "linear", "none")] +
           [Variant("ffn", n) for n in ("parent", "ffn50", "linear", "none")] for _ in loaded.spec.layers]
    out = tmp_path_factory.mktemp("bld")
    errors = bld.run(loaded, _ids(n=8, seq=16, seed=1), lib, importance, out, bld.BLDConfig(steps=40, lr=3e-3, batch_size=4))
    return loaded, importance, lib, out, errors


def test_blockwise_distillation_lowers_each_variants_error(trained):
    loaded, importance, lib, out, errors = trained
    import json

    for i, variants in enumerate(lib):
        assert errors[i]["attention:parent"] == 0.0 and errors[i]["ffn:none"] == 1.0
        for v in variants:
            if v.trained:
                losses = json.loads(bld.variant_file(out, i, v).with_suffix(".json").read_text())["losses"]
                assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (i, v, losses[:5], losses[-5:])


def test_blockwise_distillation_resumes_from_finished_variants(trained, tmp_path):
    import shutil

    loaded, importance, lib, out, errors = trained
    config, said = bld.BLDConfig(steps=40, lr=3e-3, batch_size=4), []
    # a finished run is read back whole: nothing recorded, nothing trained
    again = bld.run(loaded, _ids(n=8, seq=16, seed=1), lib, importance, out, config, status=said.append)
    assert again == errors and not said
    # with its summary gone, each variant is read back and evaluated on a fresh recording, none retrained
    # (training is random-batch, so a retrained variant would not give the same error)
    copy = shutil.copytree(out, tmp_path / "bld")
    (copy / bld.ERRORS_FILE).unlink()
    again = bld.run(loaded, _ids(n=8, seq=16, seed=1), lib, importance, copy, config, status=said.append)
    assert again == errors and said and (copy / bld.ERRORS_FILE).is_file()


def test_replace_one_block_scores(trained):
    loaded, importance, lib, out, _ = trained
    held_out = _ids(n=2, seq=16, seed=2)
    candidates = {(i, v): bld.load_variant(loaded, i, v, out, importance) for i in (0, 3) for v in lib[i]}
    kl = scores.replace_one_block(loaded, held_out, candidates, batch_size=2)
    assert kl[(0, Variant("attention", "parent"))] == 0.0
    assert all(value >= 0 for value in kl.values())
    assert kl[(3, Variant("ffn", "none"))] > 0
    # a copy of the parent's own module run through the suffix path scores 0: the path is exact
    same = {(3, Variant("ffn", "linear")): copy.deepcopy(loaded.model.model.layers[3].mlp)}
    assert scores.replace_one_block(loaded, held_out, same, batch_size=2)[(3, Variant("ffn", "linear"))] < 1e-9


@pytest.mark.parametrize("kernels", [False, True])  # published peaks; a runtime's measured costs per token and layer
def test_costs_add_up_to_the_assembled_estimate(trained, kernels):
    import dataclasses

    from shrink.hardware.calibration import KernelRate, RuntimeCalibration

    loaded, importance, lib, out, _ = trained
    profile, workload = get_profile("jetson-orin-nano"), Workload(prompt_len=64, gen_len=8)
    if kernels:  # as on a calibrated host: fixed costs per layer are paid once per layer, whatever it holds
        measured = RuntimeCalibration("llama.cpp", {loaded.spec.formats.weights: KernelRate(10.0, 0.2)}, 1e-4, 2e-5,
                                      1e-3, 1e-4, 2, "test figures")
        profile = dataclasses.replace(profile, calibrations={"llama.cpp": measured})
    fixed, table = solve.costs(loaded.spec, lib, profile, workload)
    assert table[(0, Variant("attention", "none"))] == solve.Cost(0.0, 0.0, 0.0)
    assert table[(0, Variant("attention", "linear"))].memory_bytes < table[(0, Variant("attention", "parent"))].memory_bytes
    choice = {i: {"attention": lib[i][i % 3], "ffn": lib[i][3 + i % 4]} for i in range(len(lib))}
    spec = solve.assembled_spec(loaded.spec, choice)
    e = estimate(spec, profile, workload)
    assert (e.runtime == "llama.cpp") == kernels
    total = fixed
    for i, subs in choice.items():
        for v in subs.values():
            total = total + table[(i, v)]
    assert total.decode_s == pytest.approx(e.decode.time_s, rel=1e-9)
    assert total.prefill_s == pytest.approx(e.prefill.time_s, rel=1e-9)
    assert total.memory_bytes == pytest.approx(e.memory.weights_bytes + e.memory.kv_cache_bytes, rel=1e-9)


def test_program_matches_brute_force_and_meets_every_limit():
    gen = torch.Generator().manual_seed(3)
    names = ["parent", "linear", "none"]
    table, kl = {}, {}
    for i in range(4):
        for j, n in enumerate(names):
            key = (i, Variant("attention", n))
            table[key] = solve.Cost(*(float(x) for x in (3 - j) * (1 + torch.rand(3, generator=gen))))
            kl[key] = 0.0 if j == 0 else float(j * torch.rand(1, generator=gen))
    fixed = solve.Cost(1.0, 2.0, 3.0)
    full = fixed
    for i in range(4):
        full = full + table[(i, Variant("attention", "parent"))]
    for share in (0.9, 0.7, 0.5):
        limits = solve.Limits(decode_s=fixed.decode_s + share * (full.decode_s - fixed.decode_s),
                              memory_bytes=fixed.memory_bytes + share * (full.memory_bytes - fixed.memory_bytes))
        best = solve.solve(kl, table, fixed, limits)[0]
        reference = solve.brute_force(kl, table, fixed, limits)
        assert best.score == pytest.approx(reference.score)
        assert best.cost.decode_s <= limits.decode_s + 1e-9 and best.cost.memory_bytes <= limits.memory_bytes + 1e-9
    alternatives = solve.solve(kl, table, fixed, solve.Limits(decode_s=full.decode_s), alternatives=3, max_overlap=0.5)
    assert len({tuple(sorted((i, s["attention"]) for i, s in enumerate(a.to_dict()["layers"]))) for a in alternatives}) \
        == len(alternatives) > 1
    with pytest.raises(ShrinkError, match="No choice of block variants meets the budget"):
        solve.solve(kl, table, fixed, solve.Limits(decode_s=fixed.decode_s * 0.5))


def test_assembled_model_is_real_and_reloads(trained, tmp_path):
    from shrink.model import load, save

    loaded, importance, lib, out, _ = trained
    choice = {i: {"attention": lib[i][i % 3], "ffn": lib[i][3 + i % 4]} for i in range(len(lib))}
    child = assemble(loaded, choice, out, importance)
    assert child.spec.layers == solve.assembled_spec(loaded.spec, choice).layers
    params = sum(p.numel() for p in child.model.parameters())
    assert params == child.spec.param_counts().total < loaded.spec.param_counts().total
    ids = _ids(n=1, seq=12, seed=4)
    with torch.no_grad():
        expected = child.model(ids).logits
        reloaded = load(str(save(child.model, tmp_path / "child")))
        assert torch.equal(reloaded.model(ids).logits, expected)
    assert reloaded.spec.layers == child.spec.layers


def test_families_without_attention_and_ffn_in_every_layer_are_refused(tiny_model):
    with pytest.raises(ShrinkError, match="Puzzle needs a decoder"):
        library.library(tiny_model("nemotron_h").spec)
    spec = tiny_model("llama").spec
    layers = (replace(spec.layers[0], ffn=None),) + spec.layers[1:]
    with pytest.raises(ShrinkError, match="every layer must hold"):
        library.library(replace(spec, layers=layers))


def _half_the_blocks(spec, target="jetson-orin-nano"):
    """A time-per-token budget that leaves the blocks half of the parent's block time (estimated)."""
    profile = get_profile(target)
    fixed, _ = solve.costs(spec, library.library(spec), profile, Workload())
    parent = estimate(spec, profile, Workload()).tpot_s
    return fixed.decode_s + 0.5 * (parent - fixed.decode_s)


def test_puzzle_command_meets_the_budget_and_saves_a_real_model(tiny_text_model_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from shrink.cli.app import app
    from shrink.model import load

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    parent = load(str(model_dir))
    budget = _half_the_blocks(parent.spec)
    args = ["puzzle", str(model_dir), "-t", "jetson-orin-nano", "--data", str(text), "--seq-len", "16",
            "--bld-steps", "10", "--distill-tokens", "512", "--hidden-weight", "0.5", "-o", str(tmp_path / "out"), "--json"]
    result = CliRunner().invoke(app, [*args, "--budget", f"{budget * 1e3:.9f}ms"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["chosen_estimated"]["decode_s"] <= budget < report["parent_estimated"]["decode_s"]
    child = load(str(tmp_path / "out"))
    assert child.spec.param_counts().total < parent.spec.param_counts().total
    assert child.spec.layers == child.spec.from_dict(report["spec"]).layers
    assert estimate(child.spec, get_profile("jetson-orin-nano"), Workload()).tpot_s == pytest.approx(
        report["chosen_estimated"]["decode_s"], rel=1e-9)
    kl = report["distillation"]["eval_after"]["kl"]
    assert kl <= report["distillation"]["eval_before"]["kl"]
    impossible = CliRunner().invoke(app, [*args[:-3], "-o", str(tmp_path / "never"), "--budget", "0.001us"])
    assert impossible.exit_code == 2 and "No choice of block variants meets the budget" in impossible.output
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.work" / "bld").exists()
    unbudgeted = CliRunner().invoke(app, [*args[:-3], "-o", str(tmp_path / "never")])
    assert unbudgeted.exit_code == 2 and "needs a budget" in unbudgeted.output


@pytest.mark.parametrize("family, kind", [("llama", "none"), ("llama", "linear"), ("gemma3", "none")])
def test_a_variant_in_layer_0_keeps_the_cache_position_count(tiny_model, family, kind):
    """transformers reads a cache's length from layer 0: a variant there must still count positions."""
    from transformers import DynamicCache

    from shrink.blockvariants import mixer_variant

    model = tiny_model(family).model
    model.model.layers[0].self_attn = mixer_variant(kind, model.config.hidden_size, model.dtype, 0)
    ids = _ids(n=1, seq=12)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(5, 12)]
    assert cache.get_seq_length() == 12
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_each_process_trains_a_disjoint_share_of_the_variants(tiny_model, tmp_path):
    from shrink.compress.distill.parallel import World

    loaded = tiny_model("llama")
    lib = library.library(loaded.spec, shares=(0.5,))
    jobs = [(i, v) for i, variants in enumerate(lib) for v in variants if v.trained]
    seen = {}

    class SecondOfTwo(World):
        def barrier(self):  # what this process has written when it waits for the other one
            seen["files"] = {p.name for p in tmp_path.glob("*.safetensors")}

    bld.run(loaded, _ids(n=4), lib, score(loaded, _ids(), batch_size=2), tmp_path, bld.BLDConfig(steps=2),
            current=SecondOfTwo(rank=1, size=2))
    assert seen["files"] == {bld.variant_file(tmp_path, i, v).name for i, v in jobs[1::2]}


def test_blockwise_distillation_gives_the_parent_back_trainable(tiny_model, tmp_path):
    loaded = tiny_model("llama")
    lib = [[Variant("attention", "parent"), Variant("ffn", "linear")] for _ in loaded.spec.layers]
    bld.run(loaded, _ids(n=4), lib, None, tmp_path, bld.BLDConfig(steps=1))
    assert all(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize("shape", [{}, {"num_key_value_heads": 1, "tie_word_embeddings": False}])
def test_an_all_attention_granitemoehybrid_built_from_a_llama_reproduces_its_logits(tiny_model, tmp_path, shape):
    """GraniteMoeHybrid, the Hugging Face host of attention/Mamba2 hybrids (and llama.cpp's granitehybrid): the
    Llama's weights in it give the Llama's logits; a layer typed Mamba holds a Mamba2 mixer instead and changes
    them; the model saves and reloads as transformers' own class."""
    from shrink.compress.puzzle.granite import ATTENTION, MAMBA, granite_from_llama
    from transformers import AutoModelForCausalLM

    llama = tiny_model("llama", num_hidden_layers=3, **shape).model
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    granite = granite_from_llama(llama)
    hybrid = granite_from_llama(llama, [ATTENTION, MAMBA, ATTENTION])
    with torch.no_grad():
        expected = llama(ids).logits
        assert torch.allclose(granite(ids).logits, expected, atol=1e-5)
        assert (hybrid(ids).logits - expected).abs().max() > 1e-2
        assert hybrid.model.layers[1].mamba is not None and hybrid.model.layers[1].self_attn is None
        granite.save_pretrained(tmp_path / "granite")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "granite").eval()
        assert type(reloaded).__name__ == "GraniteMoeHybridForCausalLM"
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    with pytest.raises(ShrinkError, match="linear_attention"):
        granite_from_llama(llama, [ATTENTION, "mamba"])
