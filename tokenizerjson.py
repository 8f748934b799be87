"""A Hugging Face fast tokenizer's tokenizer.json, read for what rewrites it (vocabulary trimming) or
converts it (GGUF): both need a BPE model and refuse anything else in one sentence of their own."""

from __future__ import annotations

import json
from typing import Any

from shrink.errors import ShrinkError


def bpe_tokenizer_json(tokenizer: Any, no_json: str, not_bpe: str) -> dict:
    """tokenizer.json of `tokenizer` as a dict, its model a BPE. `no_json` ends the refusal of a slow
    (Python-only) tokenizer; `not_bpe` that of another model type."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ShrinkError(f"This tokenizer has no tokenizer.json (a slow, Python-only tokenizer); {no_json}")
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "BPE":
        raise ShrinkError(f"The tokenizer is a {spec['model'].get('type')} model; {not_bpe}")
    return spec
