"""Tiny random-weight configs, one per supported family, small enough to build in milliseconds."""

from __future__ import annotations

from transformers import (
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    NemotronHConfig,
    Qwen2Config,
    Qwen3Config,
)

COMMON = {"vocab_size": 101, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
          "num_key_value_heads": 2}


# Nemotron-H blocks hold one mixer each: SSM, MLP, attention, MLP, SSM (dense: the tiny config's MoE block
# becomes an MLP, for what refuses MoE)
NEMOTRON_DENSE = ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention"]
VARIANTS = {"nemotron_h-dense": ("nemotron_h", {"layers_block_type": NEMOTRON_DENSE})}


def tiny_configs() -> dict:
    return {
        "llama": LlamaConfig(num_hidden_layers=2, **COMMON),
        "llama-bias": LlamaConfig(num_hidden_layers=2, attention_bias=True, mlp_bias=True, **COMMON),
        "mistral": MistralConfig(num_hidden_layers=2, sliding_window=16, **COMMON),
        "qwen2": Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, **COMMON),
        "qwen3": Qwen3Config(num_hidden_layers=2, head_dim=16, **COMMON),
        "gemma3": Gemma3TextConfig(
            num_hidden_layers=6, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, tie_word_embeddings=True,
            **COMMON,
        ),
        "nemotron_h": NemotronHConfig(
            vocab_size=101,
            hidden_size=32,
            layers_block_type=["linear_attention", "mlp", "full_attention", "moe", "linear_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=2,
            ssm_state_size=16,
            conv_kernel=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            moe_shared_expert_intermediate_size=24,
        ),
    }


def build(name: str, **overrides):
    """A tiny random model of family `name` (a key of tiny_configs() or of VARIANTS), eval mode,
    weights drawn after torch.manual_seed(0); each override is set on the config as an attribute
    (num_hidden_layers=3, hidden_size=256, ...). Returns the bare Hugging Face model."""
    import torch
    from transformers import AutoModelForCausalLM

    family, defaults = VARIANTS.get(name, (name, {}))
    config = tiny_configs()[family]
    for key, value in {**defaults, **overrides}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def peaked(model, factor: float = 16.0):
    """Scale the final norm of a random tiny model so that its logits spread (std ~2 instead of ~0.1):
    its next-token distribution is then far from uniform, and a pruned or quantized student's KL to
    it is a real distance rather than ~0 by construction. Returns the model."""
    import torch

    final = [m for name, m in model.named_modules() if name.endswith(("model.norm", "norm_f"))][-1]
    with torch.no_grad():
        final.weight.mul_(factor)
    return model


def perturbed(model, std: float = 0.02, seed: int = 1):
    """Add Gaussian noise to every 2-D weight but the embeddings: a student with a real distance to
    its teacher (a pruned random tiny model is within 0.001 nats of it), for distillation to close."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def tiny_corpus() -> list[str]:
    """Text the project makes, repeated so that BPE learns merges across scripts, digits and whitespace."""
    from shrink.export.prompts import DEFAULT_TEXTS
    from shrink.export.tokenizer_parity import ADVERSARIAL_TEXTS

    return (DEFAULT_TEXTS + ADVERSARIAL_TEXTS) * 3


def byte_level_tokenizer(style: str):
    """A byte-level BPE trained here, laid out as Llama 3's (BOS added, whole words looked up first)
    or Qwen2's (NFC, single digits, no BOS, chat tokens) tokenizer.json is."""
    from shrink.export.gguf_tokenizer import PRE_TOKENIZER_PATTERNS
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama3 = style == "llama3"
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if llama3 else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE(ignore_merges=llama3))
    pattern = PRE_TOKENIZER_PATTERNS["llama-bpe" if llama3 else "qwen2"]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if not llama3:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(tiny_corpus(), trainer)
    if llama3:
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                 special_tokens=[("<|begin_of_text|>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return fast


def save_tiny_bpe_model(root):
    """A tiny 4-layer Llama with a Llama-3-style byte-level BPE tokenizer (one llama.cpp converts), saved in
    `root` as a Hugging Face directory, and a text file to train on: (directory, text file)."""
    from shrink.export.prompts import DEFAULT_TEXTS
    from shrink.model import save

    tokenizer = byte_level_tokenizer("llama3")
    model = peaked(build("llama", num_hidden_layers=4, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id))
    directory = save(model, root / "tiny-llama3", tokenizer=tokenizer)
    text = root / "corpus.txt"
    text.write_text("\n\n".join(DEFAULT_TEXTS * 4))
    return directory, text


def reference_llama(model, ids, k=None, kv_weight=None, sources=None):
    """A Llama forward from first principles: from layer k on, keys and values come from RMS-normalising
    the stream entering layer k with `kv_weight`, through each layer's own k_proj and v_proj; layer i
    attends to the keys and values of layer sources.get(i, i)."""
    import torch

    sources = sources or {}
    config = model.config
    d = config.head_dim
    x = model.model.embed_tokens(ids)
    seq = ids.shape[1]
    inv = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(seq).float(), inv)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    def rms(t, weight):
        return weight * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    kv, kv_input = {}, None
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if i == k:
            kv_input = rms(x, kv_weight)
        h = rms(x, layer.input_layernorm.weight)
        q = rope(attn.q_proj(h).unflatten(-1, (-1, d)).transpose(1, 2))
        if sources.get(i, i) == i:
            source = kv_input if k is not None and i >= k else h
            kv[i] = (rope(attn.k_proj(source).unflatten(-1, (-1, d)).transpose(1, 2)),
                     attn.v_proj(source).unflatten(-1, (-1, d)).transpose(1, 2))
        key, value = kv[sources.get(i, i)]
        groups = q.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        weights = torch.softmax(q @ key.transpose(-1, -2) / d ** 0.5 + mask, -1)
        x = x + attn.o_proj((weights @ value).transpose(1, 2).flatten(-2))
        h = rms(x, layer.post_attention_layernorm.weight)
        x = x + layer.mlp.down_proj(torch.nn.functional.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
    return model.lm_head(rms(x, model.model.norm.weight))
