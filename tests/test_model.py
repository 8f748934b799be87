"""Loading from every kind of source, saving, and one-sentence errors for bad input."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from shrink.errors import ShrinkError
from shrink.model import load, load_spec, save
from tiny_models import tiny_configs


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "nemotron_h"])
def test_save_then_transformers_load_gives_identical_logits(tmp_path, name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_configs()[name]).eval()
    save(model, tmp_path / name)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
    ids = torch.randint(0, 101, (2, 12))
    assert torch.equal(_logits(model, ids), _logits(again, ids))


def test_load_hf_directory(tiny_llama_dir):
    loaded = load(str(tiny_llama_dir))
    assert loaded.spec.family == "llama"
    assert loaded.spec.param_counts().total == sum(p.numel() for p in loaded.model.parameters())
    assert loaded.tokenizer is None  # the tiny model ships no tokenizer


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path, tiny_llama_dir):
    model = load(str(tiny_llama_dir)).model
    target = tmp_path / "out"
    save(model, target)
    save(model, target)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_spec_from_config_json_needs_no_weights(tiny_llama_dir):
    from dataclasses import replace

    from_json = load_spec(str(tiny_llama_dir / "config.json"))
    assert replace(from_json, name="") == replace(load_spec(str(tiny_llama_dir)), name="")


def test_archspec_json_is_a_source(tmp_path):
    spec = load_spec("llama-3.1-8b")
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    assert load_spec(str(path)).layers == spec.layers


def _file(name, data):
    def make(directory):
        path = directory / name
        path.write_bytes(data)
        return path

    return make


def _empty_dir(directory):
    (directory / "empty").mkdir()
    return directory / "empty"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "No such file or directory"),
        (_empty_dir, "neither a config.json"),
        (_file("x.gguf", b"NOPE" * 10), "not a GGUF file"),
        (_file("t.gguf", b"GGUF\x03\x00\x00\x00"), "corrupt or truncated"),
        (_file("c.json", b"{not json"), "Could not read"),
        (_file("d.json", b'{"hidden_size": 3}'), "no 'model_type'"),
        (_file("w.bin", b"x"), "not a .gguf file"),
    ],
)
def test_bad_sources_fail_with_one_sentence(tmp_path, make, message):
    with pytest.raises(ShrinkError, match=message):
        load_spec(str(make(tmp_path)))


def test_truncated_gguf_of_the_real_model_is_refused(tmp_path):
    from shrink.model import embedded_gguf_path

    source = embedded_gguf_path()
    truncated = tmp_path / "truncated.gguf"
    with source.open("rb") as handle:
        truncated.write_bytes(handle.read(2_000_000))
    with pytest.raises(ShrinkError, match="corrupt or truncated"):
        load_spec(str(truncated))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ShrinkError, match="Hugging Face hub"):
        load_spec("no-such-org/no-such-model")


def test_hub_id_reads_its_config_json_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """A hub id's spec needs only its config.json, read through the hub client's cache."""
    import json

    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    config = {"model_type": "llama", "vocab_size": 101, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    spec = load_spec("some-org/tiny")
    assert spec.name == "some-org/tiny" and spec.num_layers == 3
    # 101 x 32 embedding and untied head, 3 layers of q/k/v/o (32x32, 2 x 16x32, 32x32), MLP 3 x 32x48,
    # two norms of 32, and the final norm: counted by hand, not by the code under test
    per_layer = 32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 32 * 48 + 2 * 32
    assert spec.param_counts().total == 2 * 101 * 32 + 3 * per_layer + 32


def test_config_json_without_weights_cannot_be_loaded(tiny_llama_dir):
    with pytest.raises(ShrinkError, match="without weights"):
        load(str(tiny_llama_dir / "config.json"))


@pytest.mark.slow
def test_embedded_model_loads_and_continues_sensibly(embedded):
    assert embedded.spec.family == "gemma3"
    assert embedded.spec.num_layers == 18 and embedded.spec.hidden_size == 640
    assert embedded.spec.param_counts().total == sum(p.numel() for p in embedded.model.parameters())
    ids = embedded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = embedded.model.generate(ids, max_new_tokens=12, do_sample=False)
    text = embedded.tokenizer.decode(out[0, ids.shape[1]:])
    assert "France" in text or "Paris" in text, text


@pytest.mark.slow
def test_embedded_model_save_round_trip_is_exact(embedded, tmp_path):
    save(embedded.model, tmp_path / "gemma", tokenizer=embedded.tokenizer)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma", dtype=torch.float32).eval()
    ids = embedded.tokenizer("Roofline models bound time by compute and memory.", return_tensors="pt").input_ids
    assert torch.equal(_logits(embedded.model, ids), _logits(again, ids))


def test_non_uniform_model_saves_and_reloads_through_shrink(tmp_path):
    """Per-layer FFN widths and head counts survive save + model.load, and load_spec sees them."""
    import torch
    from transformers import AutoModelForCausalLM

    from shrink.families import spec_from_model
    from shrink.model import load, load_spec, save
    from tiny_models import tiny_configs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_configs()["qwen2"]).eval()  # tied, head_dim from hidden/heads
    layer = model.model.layers[1]
    layer.mlp.gate_proj, layer.mlp.up_proj = torch.nn.Linear(32, 20, bias=False), torch.nn.Linear(32, 20, bias=False)
    layer.mlp.down_proj = torch.nn.Linear(20, 32, bias=False)
    attn = model.model.layers[0].self_attn  # 2 query heads for 2 KV heads instead of 4
    attn.q_proj = torch.nn.Linear(32, 2 * attn.head_dim, bias=True)
    attn.o_proj = torch.nn.Linear(2 * attn.head_dim, 32, bias=False)
    attn.num_key_value_groups = 1
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
    spec = spec_from_model(model)
    assert not spec.is_uniform
    save(model, tmp_path / "nonuniform")
    again = load(str(tmp_path / "nonuniform"))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, expected)
    assert again.spec.layers == spec.layers
    assert load_spec(str(tmp_path / "nonuniform")).param_counts() == spec.param_counts()


@pytest.mark.slow
def test_the_shipped_embedded_config_is_the_converted_one(embedded, tmp_path, monkeypatch):
    """A config-only command on a fresh machine reads configs/embedded/gemma-3-270m.json instead of waiting
    for the conversion: it must describe exactly the model the conversion writes."""
    from shrink.model import load_spec

    converted = load_spec("gemma-3-270m")  # the `embedded` fixture converted it into the cache
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "empty"))
    shipped = load_spec("gemma-3-270m")
    assert shipped == converted and shipped.num_layers == embedded.spec.num_layers
    assert not (tmp_path / "empty" / "models" / "gemma-3-270m" / "config.json").exists()
