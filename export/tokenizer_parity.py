"""Tokenizer parity: the artifact's runtime must turn text into the same token ids as the Hugging Face
tokenizer the model was trained with, or every figure measured on ids says nothing about real text.

Checked on the verify prompts and on text chosen to break converters: mixed scripts, emoji, digits and
long numbers, runs of spaces, tabs and newlines, code, and text that spells the special tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shrink.export.prompts import DEFAULT_TEXTS
from shrink.export.verify import Check

ADVERSARIAL_TEXTS = [
    "Ünïcödé façade — naïve café; Ελληνικά, русский, עברית, العربية, हिन्दी, 中文汉字, 日本語のかな, 한국어.",
    "Emoji: 👍🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️‍🔥 🤖… and a zero-width joiner\u200d here, a no-break\u00a0space, a soft\u00adhyphen.",
    "Numbers 0 7 42 1234 12345678901234567890 3.14159265358979 -0.000001 1e-9 1,000,000 ٣٤٥ ⅷ ² 2024-12-03T15:52:17Z",
    "Spaces:  two,   three,    four,                sixteen; trailing   \n\tTabs\t\tand\t\t\ttabs\n\n\nNewlines\r\nCRLF\r\r\n ",
    "    def f(x):\n\t\treturn {'k': [x**2 for x in range(10) if x % 3 != 0]}  # comment\n}\n\n#include <stdio.h>\nint main(){printf(\"%d\\n\", 1<<4);}",
    "URLs https://example.com/a_b-c?d=1&e=%20#f, emails a.b+c@d.org, paths C:\\Users\\x\\file.txt ~/x/.y",
    "Contractions: I'm, you're, it's, we've, they'll, he'd, DON'T, Can'T; quotes ‘single’ “double” «guillemets»",
    " leading space, double  space before end.  ",
    "",
    "a",
    "\n",
]


@dataclass
class TokenizerMismatch:
    text: str
    position: int
    expected: list[int]
    got: list[int]
    expected_piece: str
    got_piece: str

    def sentence(self) -> str:
        return (f"tokenization differs at token {self.position} of {self.text[:40]!r}: the Hugging Face "
                f"tokenizer gives {self.expected_piece!r}, the artifact {self.got_piece!r}")


def parity_texts(tokenizer: Any, extra: list[str] | None = None) -> list[str]:
    """The verify prompts, the adversarial set and text that spells each special and added token."""
    specials = sorted({*getattr(tokenizer, "all_special_tokens", []), *list(getattr(tokenizer, "get_added_vocab", dict)())[:64]})
    spelled = [f"before{token}after {token} {token}{token}." for token in specials if token]
    return [*DEFAULT_TEXTS, *ADVERSARIAL_TEXTS, *spelled, *(extra or [])]


def first_mismatch(tokenizer: Any, runtime_tokenize: Any, texts: list[str]) -> TokenizerMismatch | None:
    """The first text whose ids differ between the Hugging Face tokenizer and `runtime_tokenize(text)
    -> ids`, with where (None: all agree)."""
    for text in texts:
        expected = list(tokenizer(text).input_ids)
        got = list(runtime_tokenize(text))
        if expected != got:
            position = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
            return TokenizerMismatch(text, position, expected, got, _piece(tokenizer, expected, position),
                                     _piece(tokenizer, got, position))
    return None


def _piece(tokenizer: Any, ids: list[int], position: int) -> str:
    return tokenizer.convert_ids_to_tokens(ids[position]) if position < len(ids) else "<end>"


def parity_check(tokenizer: Any, runtime_tokenize: Callable[[str], list[int]], runtime: str,
                 extra: list[str] | None = None) -> Check:
    """The verify check: every parity text tokenized identically, or the first difference named."""
    texts = parity_texts(tokenizer, extra)
    mismatch = first_mismatch(tokenizer, runtime_tokenize, texts)
    if mismatch is None:
        return Check("tokenizer parity", True, f"{len(texts)} texts (verify prompts, adversarial set, spelled special "
                                               f"tokens) tokenized identically by {runtime} and the Hugging Face tokenizer")
    return Check("tokenizer parity", False, f"{runtime}'s {mismatch.sentence()}")
