"""What a trimmed vocabulary is, where it is recorded and how the original model is read through it.

A model whose vocabulary was trimmed (compress/vocab.py) keeps one list in its config, under
`vocab_trim`: the original id of each of its token ids (ascending), the original vocabulary size and a
map of every original id into the trimmed ids.
That list is all that links the two id spaces:
- a trimmed id i is the original id kept[i] (the same token string);
- `mapped` sends every original id to a trimmed id: a kept token to its new id, a removed token to the
  first piece the trimmed tokenizer spells its text with. The original model's next-token distribution
  carried over along that map (`kept_view`) is what it predicts for the next trimmed token (to first
  order: a removed token's pieces are not merged with the text after it), so distillation and
  verification compare the trimmed model with what the original says in the trimmed ids. The
  probability the original puts on removed tokens is reported beside it (`outside_mass`).

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
    # per original id, the trimmed id its text starts with in the trimmed tokenizer (a kept id: its own new
    # id; a removed one: its first piece), -1 for rows without text; empty: every removed id has none
    mapped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if list(self.kept) != sorted(set(self.kept)) or not self.kept:
            raise ShrinkError("A trimmed vocabulary's kept ids must be distinct, ascending and not empty.")
        if self.kept[-1] >= self.original_size:
            raise ShrinkError(f"A kept id ({self.kept[-1]}) lies outside the original vocabulary of {self.original_size}.")
        if self.mapped and (len(self.mapped) != self.original_size or max(self.mapped) >= self.size):
            raise ShrinkError("A trimmed vocabulary's map must give one trimmed id (or -1) per original id.")

    def targets(self) -> list[int]:
        """Per original id, the trimmed id the original's probability for it goes to (-1: nowhere)."""
        if self.mapped:
            return list(self.mapped)
        targets = [-1] * self.original_size
        for new, old in enumerate(self.kept):
            targets[old] = new
        return targets

    @property
    def size(self) -> int:
        return len(self.kept)

    def new_ids(self) -> dict[int, int]:
        """original id -> trimmed id, for the kept ids only."""
        return {old: new for new, old in enumerate(self.kept)}

    def to_dict(self) -> dict[str, Any]:
        return {"original_size": self.original_size, "kept": list(self.kept), "mapped": list(self.mapped)}

    @classmethod
    def from_dict(cls, data: dict) -> VocabTrim:
        return cls(tuple(int(i) for i in data["kept"]), int(data["original_size"]),
                   tuple(int(i) for i in data.get("mapped", ())))

    def composed(self, inner: VocabTrim) -> VocabTrim:
        """This trim applied to a model already trimmed by `inner`: ids in the first original space."""
        if self.original_size != inner.size:
            raise ShrinkError("A vocabulary trim does not fit the vocabulary it is applied to.")
        outer = self.targets()
        mapped = tuple(outer[i] if i >= 0 else -1 for i in inner.targets())
        return VocabTrim(tuple(inner.kept[i] for i in self.kept), inner.original_size, mapped)


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
    original ids of the same tokens) and returns, as logits, the log of its next-token distribution
    carried over to the trimmed ids: a kept token's probability stays where it is, a removed token's goes
    to the first piece the trimmed tokenizer spells it with (`mapped`; without a map it is dropped and
    the rest renormalized). A torch module; its state_dict holds the kept ids and the map, so caches
    keyed by weights_hash tell two trims apart."""
    import torch

    targets = torch.tensor(trim.targets(), dtype=torch.long)
    sources = torch.nonzero(targets >= 0).flatten()

    class KeptVocabulary(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.config = model.config
            self.register_buffer("kept", torch.tensor(trim.kept, dtype=torch.long), persistent=True)
            self.register_buffer("sources", sources, persistent=True)
            self.register_buffer("targets", targets[sources], persistent=True)

        def forward(self, input_ids: Any = None, **kwargs: Any) -> Any:
            out = self.inner(self.kept[input_ids], **kwargs)
            probs = torch.softmax(out.logits.float(), -1).index_select(-1, self.sources)
            carried = probs.new_zeros((*probs.shape[:-1], len(self.kept))).index_add_(-1, self.targets, probs)
            carried = carried / carried.sum(-1, keepdim=True)  # only rows without text lose mass
            out.logits = torch.log(carried.clamp_min(torch.finfo(torch.float32).tiny))
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
