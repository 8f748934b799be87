"""ArchSpec: exact parameter counts for every family, shapes read from weights, strict JSON."""

from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from shrink.archspec import ArchSpec
from shrink.errors import ShrinkError
from shrink.families import spec_from_config, spec_from_model, supported_model_types
from shrink.model import load_spec
from tiny_models import tiny_configs

CONFIGS = tiny_configs()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_counts_equal_instantiated_model(name):
    config = CONFIGS[name]
    model = AutoModelForCausalLM.from_config(config)
    counts = spec_from_config(config).param_counts()
    assert counts.total == sum(p.numel() for p in model.parameters())
    tables = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert counts.non_embedding == sum(p.numel() for p in model.parameters() if id(p) not in tables)
    embed = model.get_input_embeddings().weight.numel()
    head = 0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel()
    assert counts.embedding == embed + head


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b"])
def test_param_counts_of_full_size_configs_on_meta_device(name):
    from shrink.model import load_config

    config = load_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert load_spec(name).param_counts().total == sum(p.numel() for p in model.parameters())


def test_llama_405b_has_its_published_parameter_count():
    # Meta's model card: 405B; the exact figure for this architecture is 405,853,388,800.
    assert load_spec("llama-3.1-405b").param_counts().total == 405_853_388_800


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_spec_from_weights_matches_spec_from_config_for_uniform_models(name):
    model = AutoModelForCausalLM.from_config(CONFIGS[name])
    assert spec_from_model(model) == spec_from_config(CONFIGS[name])


def test_non_uniform_widths_are_read_from_the_tensors():
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"])
    mlp = model.model.layers[1].mlp
    width = 24  # prune layer 1's FFN from 48 to 24 neurons, by hand
    mlp.gate_proj = torch.nn.Linear(32, width, bias=False)
    mlp.up_proj = torch.nn.Linear(32, width, bias=False)
    mlp.down_proj = torch.nn.Linear(width, 32, bias=False)
    spec = spec_from_model(model)
    assert [layer.ffn.width for layer in spec.layers] == [48, 24]
    assert not spec.is_uniform
    assert spec.param_counts().total == sum(p.numel() for p in model.parameters())


def test_gemma3_windows_follow_layer_types():
    spec = spec_from_config(CONFIGS["gemma3"])
    windows = [layer.mixer.sliding_window for layer in spec.layers]
    assert windows == [8, 8, 8, 8, 8, None]
    assert spec.is_uniform  # windows do not change weight shapes


def test_nemotron_h_layer_kinds():
    spec = spec_from_config(CONFIGS["nemotron_h"])
    assert [layer.mixer_kind for layer in spec.layers] == ["ssm", "none", "attention", "none", "ssm"]
    assert spec.layers[3].ffn.is_moe and spec.layers[1].ffn.kind == "mlp"


def test_json_round_trip_and_strict_keys():
    spec = spec_from_config(CONFIGS["nemotron_h"])
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    data = spec.to_dict()
    data["layers"][0]["mixer"]["heads_typo"] = 3
    with pytest.raises(ShrinkError, match="heads_typo"):
        ArchSpec.from_dict(data)


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ShrinkError) as err:
        spec_from_config(GPT2Config())
    assert "gpt2" in str(err.value)
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "nemotron_h"):
        assert family in supported_model_types()
        assert family in str(err.value)


# A config.json read as JSON (no transformers) must give the spec transformers' own config class gives:
# the family records hold the class defaults and derivations by hand, so each case is checked against
# the class itself. Keys a config.json omits exercise the defaults; the rest, the derivations.
JSON_CASES = {
    **{f"{t}-defaults-only": {"model_type": t}
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "nemotron_h")},
    "qwen2-windows": {"model_type": "qwen2", "num_hidden_layers": 6, "use_sliding_window": True,
                      "sliding_window": 64, "max_window_layers": 4},
    "qwen3-window-off": {"model_type": "qwen3", "num_hidden_layers": 3, "sliding_window": 64, "layer_types":
                         ["sliding_attention", "full_attention", "sliding_attention"]},
    "gemma3-period": {"model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window_pattern": 3,
                      "torch_dtype": "float32"},
    "gemma3-bidirectional": {"model_type": "gemma3_text", "num_hidden_layers": 2, "use_bidirectional_attention": True},
    "gemma3-multimodal": {"model_type": "gemma3", "torch_dtype": "bfloat16",
                          "text_config": {"model_type": "gemma3_text", "num_hidden_layers": 4, "hidden_size": 64}},
    "nemotron_h-pattern": {"model_type": "nemotron_h", "hybrid_override_pattern": "M-M*-E", "mamba_n_groups": 2,
                           "mamba_d_conv": 3, "mamba_conv_bias": False, "dtype": "float16"},
    "nemotron_h-legacy-kinds": {"model_type": "nemotron_h", "layers_block_type": ["mamba", "attention", "mlp"]},
    "llama-legacy-bias": {"model_type": "llama", "num_hidden_layers": 2, "attention_bias": True,
                          "head_dim": 64, "num_key_value_heads": None},
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_config_json_read_as_json_gives_the_spec_transformers_gives(case):
    from transformers import AutoConfig

    from shrink.families import config_from_dict

    data = JSON_CASES[case]
    reference = AutoConfig.for_model(**data)
    assert spec_from_config(config_from_dict(data)) == spec_from_config(reference)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_config_json_read_as_json_gives_the_spec_of_the_config(tmp_path, name):
    """save_pretrained writes only what differs from the defaults, so this reads what really ships."""
    CONFIGS[name].save_pretrained(tmp_path)
    from_json = load_spec(str(tmp_path / "config.json"))
    assert replace(from_json, name="") == replace(spec_from_config(CONFIGS[name]), name="")


def test_unknown_model_type_in_a_config_json_names_the_supported_ones(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(ShrinkError, match="'gpt2' is not supported; supported model types: .*llama"):
        load_spec(str(path))


def test_unknown_nemotron_h_layer_code_is_one_sentence():
    from shrink.families import config_from_dict

    with pytest.raises(ShrinkError, match=r"unknown layer codes \['X'\]"):
        config_from_dict({"model_type": "nemotron_h", "hybrid_override_pattern": "M*X"})
