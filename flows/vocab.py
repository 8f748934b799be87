"""Vocabulary trimming as a step (compress/vocab.py does the work): what `shrink trim-vocab` and a
recipe's trim-vocab step share. Besides the trimmed model it reports, on held-out calibration text,
how much text the trimmed tokenizer leaves unchanged and the probability the original model puts on the
removed tokens (both measured), and the decode time per token before and after on a target (estimated
by the roofline from the ArchSpec, whose vocab_size is the kept count)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrink.compress.data import pack
from shrink.compress.vocab import calibration_texts, split_texts, trim_vocabulary
from shrink.errors import ShrinkError
from shrink.flows.steps import Hooks
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.vocabmap import outside_mass, trim_of

MASS_SEQUENCES = 8  # held-out sequences the original's mass outside the kept set is measured on


def check_trim_settings(size: int | None, coverage: float | None, target: str | None) -> None:
    """Refuse bad settings before any model loads."""
    if (size is None) == (coverage is None):
        raise ShrinkError("Say how much vocabulary to keep: --vocab N (tokens) or --vocab-coverage F (share of the "
                          "calibration tokens, e.g. 0.999), one of the two.")
    if size is not None and size < 1:
        raise ShrinkError(f"--vocab must be a positive number of tokens, got {size}.")
    if coverage is not None and not 0.0 < coverage <= 1.0:
        raise ShrinkError(f"--vocab-coverage must be a share in (0, 1], got {coverage}.")
    if target is not None:
        get_profile(target)


def decode_estimates(spec_before: Any, spec_after: Any, target: str, weights: str | None = None) -> dict:
    """Estimated decode time per token of both shapes on `target` (the roofline, default workload)."""
    profile = get_profile(target)

    def costed(spec: Any) -> Any:
        return spec.with_formats(weights=weights, embeddings=weights) if weights else spec

    before = estimate(costed(spec_before), profile, Workload())
    after = estimate(costed(spec_after), profile, Workload())
    return {"target": target, "weights": weights or "model's own", "tpot_s_before_estimated": before.tpot_s,
            "tpot_s_after_estimated": after.tpot_s}


def trim_vocab(loaded: Any, data: str | None, hooks: Hooks, *, size: int | None = None, coverage: float | None = None,
               text_field: str = "text", seq_len: int = 256, target: str | None = None,
               weights: str | None = None, writer: Any = None, model_counts: bool = True) -> tuple[Any, dict]:
    """The trimmed LoadedModel and its report (kept counts, coverage and outside mass measured on
    held-out calibration text, decode time before/after estimated on `target` when given). Without
    `data`, the text is the one `writer` (default: `loaded`; in a run, the original model) writes."""
    check_trim_settings(size, coverage, target)
    if trim_of(loaded.model) is not None:
        hooks.status("The model was trimmed before: trimming again within its kept tokens")
    texts = calibration_texts(writer or loaded, data, text_field, status=hooks.status)
    trimmed, trim, report = trim_vocabulary(loaded, texts, size, coverage, status=hooks.status, model_counts=model_counts)
    report["data"] = data or "teacher-generated"
    held_out = split_texts(texts)[1]
    ids = [trimmed.tokenizer(text, add_special_tokens=False).input_ids for text in held_out]
    length = min(seq_len, max(2, sum(len(i) + 1 for i in ids)))
    sequences = pack(ids, length, trimmed.tokenizer.eos_token_id)[:MASS_SEQUENCES]
    hooks.status(f"Measuring the original's probability outside the kept tokens on {sequences.numel():,} held-out tokens")
    report["outside_mass_measured"] = outside_mass(loaded.model, trim, sequences)
    if target is not None:
        report["decode_estimate"] = decode_estimates(loaded.spec, trimmed.spec, target, weights)
    return trimmed, report


def tokenizer_of(directory: str | Path) -> Any:
    """The Hugging Face tokenizer saved in a model directory (a trimmed model's rewritten one, which a
    GGUF tokenizer sidecar beside it does not replace here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
