"""What a trimmed vocabulary is, where it is recorded and how the original model is read through it.

A model whose vocabulary was trimmed (compress/vocab.py) keeps one list in its config, under
`vocab_trim`: the original id of each of its token ids (ascending), and the original vocabulary size.
That list is all that links the two id spaces:
- a trimmed id i is the original id kept[i] (the same token string);
- the original model's next-token distribution over the trimmed vocabulary is its softmax over the
  kept columns, renormalized (`kept_view`): what a teacher with the trimmed vocabulary would predict,
  so distillation and verification compare like with like; the probability the original puts on the
  removed tokens is reported beside it (`outside_mass`), never hidden in a KL.

Light on purpose (torch is imported inside the functions that run models): export/ reads it as well
as compress/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shrink.errors import ShrinkError

CONFIG_KEY = "vocab_trim"


@dataclass(frozen=True)
class VocabTrim:
    kept: tuple[int, ...]  # the original id of each trimmed id, ascending
    original_size: int

    def __post_init__(self) -> None:
        if list(self.kept) != sorted(set(self.kept)) or not self.kept:
            raise ShrinkError("A trimmed vocabulary's kept ids must be distinct, ascending and not empty.")
        if self.kept[-1] >= self.original_size:
            raise ShrinkError(f"A kept id ({self.kept[-1]}) lies outside the original vocabulary of {self.original_size}.")

    @property
    def size(self) -> int:
        return len(self.kept)

    def new_ids(self) -> dict[int, int]:
        """original id -> trimmed id, for the kept ids only."""
        return {old: new for new, old in enumerate(self.kept)}

    def to_dict(self) -> dict[str, Any]:
        return {"original_size": self.original_size, "kept": list(self.kept)}

    @classmethod
    def from_dict(cls, data: dict) -> "VocabTrim":
        return cls(tuple(int(i) for i in data["kept"]), int(data["original_size"]))

    def composed(self, inner: "VocabTrim") -> "VocabTrim":
        """This trim applied to a model already trimmed by `inner`: ids in the first original space."""
        if self.original_size != inner.size:
            raise ShrinkError("A vocabulary trim does not fit the vocabulary it is applied to.")
        return VocabTrim(tuple(inner.kept[i] for i in self.kept), inner.original_size)


def trim_of(model_or_config: Any) -> VocabTrim | None:
    """The trim a model (or its config) records, or None for a model with its original vocabulary."""
    config = getattr(model_or_config, "config", model_or_config)
    data = getattr(config, CONFIG_KEY, None)
    return VocabTrim.from_dict(data) if data else None


def record(model: Any, trim: VocabTrim) -> None:
    """Write `trim` into the model's config (saved in config.json with it)."""
    setattr(model.config, CONFIG_KEY, trim.to_dict())


def kept_view(model: Any, trim: VocabTrim) -> Any:
    """The original `model` as a model over the trimmed vocabulary: it takes trimmed ids (mapped to the
    original ids of the same tokens) and returns logits over the kept ids only, so a softmax over them is
    the original's distribution renormalized to the kept set. A torch module; its state_dict holds the
    kept ids, so caches keyed by weights_hash tell two trims apart."""
    import torch

    class KeptVocabulary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.config = model.config
            self.register_buffer("kept", torch.tensor(trim.kept, dtype=torch.long), persistent=True)

        def forward(self, input_ids: Any = None, **kwargs: Any) -> Any:
            out = self.inner(self.kept[input_ids], **kwargs)
            out.logits = out.logits.index_select(-1, self.kept)
            return out

    if getattr(model.config, "vocab_size", trim.original_size) != trim.original_size:
        raise ShrinkError(f"The teacher's vocabulary has {model.config.vocab_size} tokens, but the student was trimmed "
                          f"from one of {trim.original_size}; distil from the model it was trimmed from.")
    return KeptVocabulary().eval()


def outside_mass(model: Any, trim: VocabTrim, sequences: Any, batch_size: int = 4) -> dict[str, float]:
    """The probability the original `model` puts on removed tokens, over every position of `sequences`
    (trimmed ids [n, L], mapped to the original ids): its mean, and the largest at one position."""
    import torch

    kept = torch.tensor(trim.kept, dtype=torch.long)
    total, worst, positions = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, sequences.shape[0], batch_size):
            logits = model(kept[sequences[start:start + batch_size]]).logits.float()
            inside = torch.logsumexp(logits.index_select(-1, kept), -1) - torch.logsumexp(logits, -1)
            outside = (-torch.expm1(inside)).clamp(min=0.0)
            total += float(outside.double().sum())
            worst = max(worst, float(outside.max()))
            positions += outside.numel()
    return {"mean": total / max(positions, 1), "max": worst, "positions": positions}
