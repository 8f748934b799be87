"""Distillation losses: pure functions of student and teacher logits (last dimension = vocabulary).

Every loss returns the mean over positions of a per-position divergence, in nats. Temperature
softens both distributions and the result is multiplied by T^2 so gradients keep their scale
across temperatures (Hinton et al.). TAID's only state is its interpolation coefficient, kept in
a small dataclass that a trainer stores in its checkpoint.

Teacher logits can be given in full or as top-k (log-probabilities, indices): the Gemma vocabulary
has 262,144 entries, so a cached teacher keeps only its k most likely tokens per position. At
temperature 1 the top-k KL counts the rest of the vocabulary as one more outcome (the teacher's
remaining mass against the student's), which makes it 0 for the teacher itself and a lower bound on
the full KL; renormalising over the k tokens instead read 0.065 nats for Gemma 3 270M against its own
top 64, and rewarded a student for piling mass onto them. The other losses renormalise over the k
kept tokens (a softened teacher's tail is unknown).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from shrink.errors import ShrinkError


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student): mode-covering, the classic distillation loss."""
    t = temperature
    return _kl(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1)).mean() * t * t


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM)."""
    t = temperature
    return _kl(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)).mean() * t * t


def _mixture_log(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b), computed stably from log-probabilities."""
    if weight_a <= 0:
        return log_b
    if weight_a >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1 - weight_a))


def jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon: beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1 - beta) s."""
    t = temperature
    log_t, log_s = F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1)
    log_m = _mixture_log(log_t, log_s, beta)
    return (beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)).mean() * t * t


def skew_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(t || alpha t + (1 - alpha) s), bounded where the student puts no mass."""
    t = temperature
    log_t, log_s = F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1)
    return _kl(log_t, _mixture_log(log_t, log_s, alpha)).mean() * t * t


@dataclass
class TAIDState:
    """TAID (Temporally Adaptive Interpolated Distillation): the target moves from the student towards
    the teacher as lambda grows; lambda grows faster while the loss is still falling quickly."""

    lam: float = 0.1
    lam_max: float = 1.0
    momentum: float = 0.0
    beta: float = 0.99  # momentum of the relative loss change
    step_size: float = 0.005
    previous_loss: float | None = None

    def update(self, loss: float) -> None:
        if self.previous_loss is not None and self.previous_loss > 0:
            relative_change = (self.previous_loss - loss) / self.previous_loss
            self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        self.previous_loss = loss
        increase = self.step_size * torch.sigmoid(torch.tensor(self.momentum)).item() * (1 - self.lam)
        self.lam = min(self.lam_max, self.lam + increase)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TAIDState:
        return cls(**data)


def taid(student: torch.Tensor, teacher: torch.Tensor, state: TAIDState, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_lambda || student), p_lambda = softmax((1 - lambda) stopgrad(student) + lambda teacher)."""
    t = temperature
    target = (1 - state.lam) * student.detach() + state.lam * teacher
    return _kl(F.log_softmax(target / t, -1), F.log_softmax(student / t, -1)).mean() * t * t


def _log1m_exp(log_x: torch.Tensor) -> torch.Tensor:
    """log(1 - x) from log x < 0, kept finite where x rounds to 1 (the tail is then ~1e-7)."""
    log_x = log_x.clamp(max=-1e-7)
    return torch.where(log_x > -0.6931, torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x)))


def topk_forward_kl(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Forward KL against a teacher kept as its top-k log-probabilities per position. At temperature 1:
    over the k tokens plus one bucket for everything else; otherwise renormalised over the k tokens."""
    t = temperature
    if t != 1:
        log_t = F.log_softmax(values / t, -1)
        log_s = F.log_softmax(student / t, -1).gather(-1, indices)
        return _kl(log_t, log_s).mean() * t * t
    log_s = F.log_softmax(student, -1).gather(-1, indices)
    tail_t, tail_s = _log1m_exp(torch.logsumexp(values, -1)), _log1m_exp(torch.logsumexp(log_s, -1))
    return (_kl(values, log_s) + tail_t.exp() * (tail_t - tail_s)).mean()


def chunked_lm_head_loss(hidden: torch.Tensor, lm_head: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                         temperature: float = 1.0, chunk: int = 64) -> torch.Tensor:
    """topk_forward_kl computed from hidden states chunk by chunk of positions, recomputing each chunk's
    logits in the backward pass: full-vocabulary logits never exist for more than `chunk` positions."""
    from torch.utils.checkpoint import checkpoint

    hidden = hidden.reshape(-1, hidden.shape[-1])
    values = values.reshape(-1, values.shape[-1])
    indices = indices.reshape(-1, indices.shape[-1])
    total = hidden.new_zeros(())

    def piece(h, v, i):
        return topk_forward_kl(h @ lm_head.T, v, i, temperature) * h.shape[0]

    for start in range(0, hidden.shape[0], chunk):
        sl = slice(start, start + chunk)
        total = total + checkpoint(piece, hidden[sl], values[sl], indices[sl], use_reentrant=False)
    return total / hidden.shape[0]


LOSSES: dict[str, Callable[..., Any]] = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl}


def get_loss(name: str) -> Callable[..., Any]:
    if name == "taid":
        return taid
    if name not in LOSSES:
        raise ShrinkError(f"Unknown distillation loss '{name}'; choose one of: {', '.join([*LOSSES, 'taid'])}.")
    return LOSSES[name]
