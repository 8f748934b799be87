"""Every default a step, a plan or a command falls back on, defined once, each with its reason.

The recipe steps (flows/recipe.py), the planner's recipes and `shrink prune/distill/quantize/run/bench`
read them from here. The trainer's own knobs (temperature, top-k, clipping, precision) stay the
defaults of compress/distill/trainer.DistillConfig.
"""

from __future__ import annotations

# --- data ---
SEQ_LEN = 128  # tokens per sequence: every README measurement (calibration, training, held-out) uses it
BATCH_SIZE = 4  # sequences per optimizer step: the batch of every README distillation and QAD

# --- distillation (after pruning) ---
DISTILL_TOKENS = 12_288  # 24 steps of 4 x 128: the budget benchmarks/prune_distill.py distils each student on
DISTILL_LR = 1e-4  # lowest held-out KL at that budget (prune_distill.py swept 1e-5, 1e-4, 3e-4: KL 1.772, 1.545, 1.788)
DISTILL_LOSS = "forward_kl"  # KL(teacher || student) on the cached top-k: the measure every held-out KL reports
CHECKPOINTS_PER_RUN = 8  # a killed distillation loses at most 1/8 of its steps; each checkpoint writes the model

# --- quantization ---
QUANT_FORMAT = "int4"  # a recipe's quantize step without a format: Q4_0 on GGUF, the README's 4-bit export
QUANT_RUNTIME = "gguf"  # llama.cpp: the runtime every README quantization was exported to and measured in
CALIBRATION = "auto"  # awq for Llama-style decoders, else mse: AWQ before QAD took Q4_0 from KL 0.625 to 0.465
QAD_TOKENS = 12_288  # the QAD budget of every README QAD measurement (AWQ then QAD: Q4_0 KL 0.995 -> 0.465)

# --- pruning ---
PRUNE_AXIS = "width"  # FFN, heads, hidden: at 60% kept, width lost less KL than depth in prune_distill.py
SEARCH_CANDIDATES = 4  # shapes `shrink prune --search` distils (not swept: each costs a short distillation)
SEARCH_PROXY_STEPS = 8  # distillation steps per searched shape before its KL ranks it (not swept)
DEPTH_CRITERION = "bi"  # layer importance by Block Influence: one forward pass, where "kl" takes one per layer

# --- planning (`shrink run --target --budget`) ---
# distillation steps per prune shape before its KL is measured, a short recovery: right after pruning the KL
# inverts how shapes end up (width vs depth at 40% kept: 12.0 vs 20.4 before distillation, 5.40 vs 3.01 after)
PROXY_STEPS = 4
# PTQ behind the format proxy: None is the run's own --calibration (AWQ for Llama-style decoders), as the
# executed quantize step calibrates (max-calibrated PTQ ranked NVFP4 above int4, which AWQ then reversed)
PROXY_CALIBRATION = None
EXPORT_FORMAT = "gguf"  # an export step without a format: llama.cpp, which every shipped profile names

# --- KV transforms (kv-share, single-input-kv) ---
LONG_PROMPT_LEN = 2048  # the prompt their reports estimate at: where the KV cache and prefill dominate (RAG, code)

# --- timing (`shrink bench`, a recipe's bench step) ---
BENCH_PROMPT_LEN = 128  # prompt tokens timed for prefill: the sequence length above
BENCH_GEN_LEN = 32  # decoded tokens per run: 32 samples per run for the per-token median (not swept)
BENCH_REPEATS = 3  # timed runs after one warm-up: median and spread from 3 x 32 decode samples


def distill_steps(tokens: int, batch_size: int = BATCH_SIZE, seq_len: int = SEQ_LEN) -> int:
    """Optimizer steps for a token budget (at least one)."""
    return max(1, tokens // (batch_size * seq_len))


def checkpoint_every(steps: int) -> int:
    return max(1, steps // CHECKPOINTS_PER_RUN)
