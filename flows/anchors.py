"""Estimates anchored to files measured in the same run.

On `host` the planner times the unpruned model's llama.cpp files (flows/gguf_search.py) minutes before it
chooses, while every pruned candidate is only estimated with kernels calibrated earlier. Two errors
separate such an estimate from what the run's bench step will measure: the machine's speed now against
its speed at calibration (this VM's F16 decode slowed 18% within 80 minutes of a calibration, and its
memory reads halved within one morning) and what the model's own layers cost beyond the synthetic
calibration models. A file of the same model in the same formats, measured now, carries both: a candidate's time is its roofline estimate
times that file's measured / estimated, so the roofline only has to be right in the ratio between two
shapes of one model, not in absolute time on a machine whose speed moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shrink.export.backend import costed_spec
from shrink.flows.candidates import TIME_LINE, Candidate, TargetBudget


@dataclass(frozen=True)
class Anchor:
    """A file of the model measured here: its stored formats, its time measured and estimated."""
    label: str
    weights: str
    vocabulary: str
    measured_s: float
    estimated_s: float

    @property
    def ratio(self) -> float:
        return self.measured_s / self.estimated_s

    def to_dict(self) -> dict:
        return {"label": self.label, "weights": self.weights, "vocabulary": self.vocabulary,
                "measured_s": self.measured_s, "estimated_s": self.estimated_s, "ratio": self.ratio}


def anchor_for(anchors: list[Anchor], weights: str, vocabulary: str) -> Anchor | None:
    """The file stored as the candidate would be (block weights and vocabulary), else one with its
    vocabulary (on a small model the vocabulary projection is most of a decode step), else none."""
    for same in (lambda a: (a.weights, a.vocabulary) == (weights, vocabulary), lambda a: a.vocabulary == vocabulary):
        found = [a for a in anchors if same(a)]
        if found:
            return found[-1]  # the last measured: nearest in time to the run
    return None


def anchor_candidates(candidates: list[Candidate], anchors: list[Anchor], spec: Any, budget: TargetBudget) -> None:
    """Each costed GGUF candidate of a shrink export (the quantizer's own candidate is measured) gets the
    time per token its anchor predicts, and the budget's time line is judged on that time."""
    stored: dict[str | None, Any] = {}  # a family's stored formats do not depend on the shape: one lookup each
    for candidate in candidates:
        if not candidate.costed or candidate.runtime != "gguf" or candidate.quantizer is not None:
            continue
        if candidate.format not in stored:
            stored[candidate.format] = costed_spec(spec, candidate.format, candidate.runtime).formats
        formats = stored[candidate.format]
        anchor = anchor_for(anchors, formats.weights, formats.embeddings)
        if anchor is None:
            continue
        candidate.roofline_tpot_s = candidate.tpot_s
        candidate.tpot_s *= anchor.ratio
        candidate.anchor = anchor.to_dict()
        misses = budget.tpot_s is not None and candidate.tpot_s > budget.tpot_s
        candidate.misses = [m for m in candidate.misses if m != TIME_LINE] + ([TIME_LINE] if misses else [])
