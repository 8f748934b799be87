"""Token sequences for teacher-forced verification: varied text the project ships, or a user file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError

# Varied on purpose: prose, code, numbers, a list, dialogue and other languages, so that agreement is
# not measured on one register only.
DEFAULT_TEXTS = [
    "The capital of France is Paris, and the river that runs through it is the Seine. In the spring the "
    "city fills with visitors who walk along the quays, buy old books from the green boxes and stop for "
    "coffee in small squares shaded by plane trees.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34\n",
    "Quarterly results: revenue rose 12.4% to $3.81 billion, operating margin was 17.2%, and the company "
    "raised its full-year guidance from $14.5-15.0 billion to $15.2-15.6 billion on 2025-10-28.",
    "Steps to replace a bicycle tire:\n1. Shift to the smallest cog and open the brake.\n2. Remove the "
    "wheel and deflate the tube completely.\n3. Lever one side of the tire off the rim.\n4. Pull out the "
    "old tube, check the tire for thorns, and fit the new tube.",
    "\"Are you coming to the rehearsal tonight?\" asked Maria.\n\"I can't, my train was cancelled,\" said "
    "Tom. \"Could you record the second act for me?\"\n\"Of course. Bring the score on Thursday.\"",
    "La vie est un long fleuve tranquille. Der Zug nach Berlin fährt um acht Uhr ab. El conocimiento es "
    "poder. 東京は日本の首都です。 Roofline models bound the time of each operator by compute or memory.",
]
MAX_TOKENS_PER_SEQUENCE = 128


def prompt_texts(prompts_file: str | Path) -> list[str]:
    """A user's prompts: blocks of text separated by blank lines."""
    path = Path(prompts_file)
    if not path.is_file():
        raise ShrinkError(f"Prompts file '{path}' does not exist.")
    texts = [block.strip() for block in path.read_text().split("\n\n") if block.strip()]
    if not texts:
        raise ShrinkError(f"Prompts file '{path}' holds no text (blocks are separated by blank lines).")
    return texts


def verification_sequences(tokenizer: Any | None, vocab_size: int, prompts_file: str | Path | None = None) -> list[list[int]]:
    """Token id sequences to compare on. Without a tokenizer (tiny test models), seeded random ids."""
    texts = DEFAULT_TEXTS if prompts_file is None else prompt_texts(prompts_file)
    if tokenizer is None:
        rng = random.Random(0)
        return [[rng.randrange(vocab_size) for _ in range(64)] for _ in texts]
    return [tokenizer(text).input_ids[:MAX_TOKENS_PER_SEQUENCE] for text in texts]
