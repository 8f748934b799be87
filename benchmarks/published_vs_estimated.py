"""The shipped profiles' llama.cpp rates against the published runs they were taken from: each cited model
(its Hugging Face config, written here) with llama.cpp's Q4_K_M mixture, estimated on its profile with the
llama.cpp table and without it, beside the cited tokens/s. Estimates only; the cited figures are the
sources' measurements (see each profile's [runtime."llama.cpp"].source).

    python benchmarks/published_vs_estimated.py
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load_spec
from shrink.numformats.registry import mixture_name

# (config name, hidden, layers, FFN width, heads, KV heads, vocabulary, tied): the Qwen2.5 shapes of the cited
# models (DeepSeek-R1-Distill-Qwen-32B and -14B, Qwen2.5-Coder-1.5B-Instruct)
QWEN = {"qwen2.5-32b": (5120, 64, 27648, 40, 8, 152064, False),
        "qwen2.5-14b": (5120, 48, 13824, 40, 8, 152064, False),
        "qwen2.5-1.5b": (1536, 28, 8960, 12, 2, 151936, True)}
# (model, profile, cited decode tokens/s, cited prefill tokens/s over 512 prompt tokens or None)
CITED = [("qwen2.5-32b", "jetson-agx-orin", 6.84, 201.73), ("qwen2.5-14b", "jetson-agx-orin", 14.49, 455.47),
         ("qwen2.5-1.5b", "jetson-orin-nano-super", 32.1, None)]


def more_bits(i: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down Q4_K_M stores in Q6_K."""
    return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2


def q4_k_m_spec(directory: Path, name: str):
    hidden, layers, ffn, heads, kv, vocab, tied = QWEN[name]
    (directory / name).mkdir()
    (directory / name / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "tie_word_embeddings": tied, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "use_sliding_window": False}))
    kv_width = kv * hidden // heads
    more = sum(more_bits(i, layers) for i in range(layers))
    qkv = mixture_name({"q4_k": layers * (hidden * hidden + 2 * kv_width * hidden) - more * kv_width * hidden,
                        "q6_k": more * kv_width * hidden})
    down = mixture_name({"q4_k": (layers - more) * ffn * hidden, "q6_k": more * ffn * hidden})
    formats = {"weights": "q4_k", "embeddings": "q6_k" if tied else "q4_k", "kv_cache": "fp16",
               "activations": "int8",  # what llama.cpp's quantized dot products multiply
               "ops": (("attn.qkv", qkv), ("ffn.down", down))}
    if not tied:
        formats["lm_head"] = "q6_k"
    return load_spec(str(directory / name)).with_formats(**formats)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, target, decode, prefill in CITED:
            spec = q4_k_m_spec(Path(tmp), name)
            profile = get_profile(target)
            for label, used in (("without the table", replace(profile, calibrations={})), ("with it", profile)):
                e = estimate(spec, used, Workload(1, 512, 128), "llama.cpp")
                print(f"{name:13s} Q4_K_M on {target:23s} {label:18s} decode {e.decode_tokens_per_s:7.2f} tokens/s "
                      f"estimated (cited {decode}), prefill {e.prefill_tokens_per_s:8.1f} tokens/s estimated "
                      f"(cited {prefill if prefill else 'none'})")


if __name__ == "__main__":
    main()
