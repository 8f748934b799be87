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
