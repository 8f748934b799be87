"""Greedy text generation inside an artifact's own runtime, with the artifact's own tokenizer: the
plainest proof that what was exported is a working model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shrink.errors import ShrinkError
from shrink.export.backend import backend_for


@dataclass
class Generation:
    runtime: str
    prompt: str
    text: str
    new_tokens: int
    seconds: float  # measured wall time of the whole generation, prompt included


def generate(artifact: str | Path, prompt: str, max_tokens: int, threads: int | None = None) -> Generation:
    artifact = Path(artifact)
    if max_tokens < 1:
        raise ShrinkError(f"--max-tokens must be at least 1, got {max_tokens}.")
    kind = backend_for(artifact)
    text, new_tokens, seconds = kind.generate(artifact, prompt, max_tokens, threads)
    return Generation(kind.runtime, prompt, text, new_tokens, seconds)
