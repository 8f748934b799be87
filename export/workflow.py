"""Export then verify then record: the steps every artifact goes through, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.export.backend import Backend, backend, backend_for
from shrink.export.manifest import hash_mismatches, manifest_path, read_manifest, write_manifest
from shrink.export.prompts import DEFAULT_TEXTS, MAX_TOKENS_PER_SEQUENCE, prompt_texts, verification_sequences
from shrink.export.runtimes import TorchRunner
from shrink.export.tokenizer_parity import parity_check
from shrink.export.verify import Check, Verdict, baseline_checks, compare, threshold_checks
from shrink.model import load, weights_hash
from shrink.progress import ProgressLines
from shrink.vocabmap import VocabTrim, kept_view, outside_mass, trim_of


@dataclass
class ExportResult:
    artifact: Path
    report: dict
    verdict: Verdict | None
    manifest: Path


def export_artifact(loaded: Any, fmt: str, output: str | Path, *, quant: str | None = None,
                    pad_to_uniform: bool = False, verify: bool = True, prompts_file: str | None = None,
                    block_size: int | None = None, logits: str | None = None) -> ExportResult:
    """Write the artifact with its kind's backend, check it in its runtime against `loaded` (unless
    verify=False) and write the manifest beside it. `quant` None: the backend's default, or the grid a
    quantized student brings."""
    output = Path(output)
    # one unit around the backend (the GGUF writer also counts its tensors; an ONNX export is one trace),
    # so a CI log gets the time spent at least every LOG_EVERY_S
    with ProgressLines(f"{fmt} export", 1, "artifact") as lines:
        report = backend(fmt).export(loaded, output, quant, pad_to_uniform=pad_to_uniform, block_size=block_size,
                                     logits=logits)
        lines.advance()
    trim = trim_of(loaded.model)
    if trim is not None:  # a trimmed vocabulary: how to read the original model as a reference for it
        report["vocab_trim"] = trim.to_dict()
    verdict = verify_against(output, loaded, report["quant"], prompts_file) if verify else None
    manifest = write_manifest(output, source=loaded.source, source_hash=weights_hash(loaded.model), spec=loaded.spec,
                              export=report, verify=verdict.to_dict() if verdict else None)
    return ExportResult(output, report, verdict, manifest)


def verify_against(artifact: Path, loaded: Any, fmt: str, prompts_file: str | None = None,
                   min_top1: float | None = None, max_kl: float | None = None, threads: int | None = None,
                   trim: VocabTrim | None = None) -> Verdict:
    """`trim`: the artifact has a trimmed vocabulary (vocabmap.py) and `loaded` is the original model."""
    if trim is not None and loaded.spec.vocab_size == trim.original_size:
        return _verify_trimmed(artifact, loaded, fmt, trim, prompts_file, min_top1, max_kl, threads)
    sequences = verification_sequences(loaded.tokenizer, loaded.spec.vocab_size, prompts_file)
    kind = backend_for(artifact)
    runner = kind.open_runner(artifact, max(len(s) for s in sequences), threads)
    metrics = compare(TorchRunner(loaded.model), runner, sequences)
    return Verdict(metrics, threshold_checks(metrics, fmt, min_top1, max_kl)
                   + tokenizer_checks(kind, artifact, loaded, prompts_file))


def _verify_trimmed(artifact: Path, original: Any, fmt: str, trim: VocabTrim, prompts_file: str | None,
                    min_top1: float | None, max_kl: float | None, threads: int | None) -> Verdict:
    """An artifact with a trimmed vocabulary against the original model: the verify texts tokenized by
    the artifact's own tokenizer, the original read through the kept tokens (its distribution
    renormalized to them), and the mass it puts outside them reported beside the metrics."""
    import torch

    kind = backend_for(artifact)
    texts = DEFAULT_TEXTS if prompts_file is None else prompt_texts(prompts_file)
    with kind.tokenizer(artifact) as tokenize:
        if tokenize is None:
            raise ShrinkError("The artifact has a trimmed vocabulary but carries no tokenizer, so the original's text "
                              "cannot be put into its ids.")
        sequences = [list(tokenize(text))[:MAX_TOKENS_PER_SEQUENCE] for text in texts]
    unchanged = sum([trim.kept[i] for i in ids] == original.tokenizer(text).input_ids[:len(ids)]
                    for ids, text in zip(sequences, texts)) if original.tokenizer is not None else None
    runner = kind.open_runner(artifact, max(len(s) for s in sequences), threads)
    metrics = compare(TorchRunner(kept_view(original.model, trim)), runner, sequences)
    mass = [outside_mass(original.model, trim, torch.tensor([ids])) for ids in sequences]
    positions = sum(m["positions"] for m in mass)
    mean = sum(m["mean"] * m["positions"] for m in mass) / positions
    detail = (f"the original puts {mean:.4f} of its probability (mean; max {max(m['max'] for m in mass):.4f}) on the "
              f"{trim.original_size - trim.size:,} removed tokens over {positions} positions (measured); the metrics "
              f"compare with its distribution renormalized to the {trim.size:,} kept tokens")
    if unchanged is not None:
        detail += f"; {unchanged} of {len(texts)} verify texts tokenized as the original tokenizes them"
    return Verdict(metrics, threshold_checks(metrics, fmt, min_top1, max_kl) + [Check("trimmed vocabulary", True, detail)])


def tokenizer_checks(kind: Backend, artifact: Path, loaded: Any, prompts_file: str | None = None) -> list[Check]:
    """Tokenizer parity between the artifact's runtime (`kind`, its backend) and the reference's Hugging
    Face tokenizer, when both carry one (the verify prompts and a user's prompts file among the texts)."""
    if loaded.tokenizer is None:
        return []
    with kind.tokenizer(artifact) as tokenize:
        if tokenize is None:
            return [Check("tokenizer parity", True, f"the artifact carries no tokenizer ({kind.runtime} runs token ids)")]
        return [parity_check(loaded.tokenizer, tokenize, kind.runtime, prompt_texts(prompts_file) if prompts_file else None)]


def verify_artifact(artifact: str | Path, reference: str | None = None, *, prompts_file: str | None = None,
                    baseline: str | None = None, min_top1: float | None = None, max_kl: float | None = None,
                    top1_tolerance: float = 0.01, kl_tolerance: float = 0.02, threads: int | None = None) -> Verdict:
    """The CI gate: integrity against the artifact's own manifest, quality against the reference,
    and, given a baseline manifest, no regression beyond the tolerances."""
    artifact = Path(artifact)
    kind = backend_for(artifact)
    own = manifest_path(artifact)
    manifest = read_manifest(own) if own.is_file() else None
    baseline_manifest = read_manifest(Path(baseline)) if baseline else None
    if manifest is not None:
        problems = hash_mismatches(artifact, manifest)
        if problems:
            return Verdict(None, [Check("integrity", False, f"artifact does not match its manifest ({'; '.join(problems)})")])
        integrity = Check("integrity", True, f"every file matches the sha256 in {own.name}")
    else:
        integrity = Check("integrity", True, "no manifest beside the artifact: integrity not checked")
    reference = reference or (manifest or {}).get("source", {}).get("model")
    if reference is None:
        raise ShrinkError("No --reference given and no manifest beside the artifact names its source model.")
    fmt = kind.stored_quant(artifact)  # read from the file: what it stores, whatever a manifest says
    trimmed = (manifest or {}).get("export", {}).get("vocab_trim")
    verdict = verify_against(artifact, load(reference), fmt, prompts_file, min_top1, max_kl, threads,
                             trim=VocabTrim.from_dict(trimmed) if trimmed else None)
    verdict.checks.insert(0, integrity)
    if baseline_manifest is not None:
        verdict.checks += baseline_checks(verdict.metrics, baseline_manifest, top1_tolerance, kl_tolerance)
    return verdict

