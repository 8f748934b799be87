"""Held-out evaluation of a student: KL to the cached teacher and perplexity on the real next tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shrink.compress.distill.chunked import Head, evaluate_sliced
from shrink.compress.distill.losses import topk_forward_kl


@dataclass(frozen=True)
class Evaluation:
    kl: float  # mean KL(teacher || student) per position, nats, over its top k + the rest (losses.py)
    perplexity: float  # exp of the mean next-token cross-entropy

    def to_dict(self) -> dict:
        return {"kl": self.kl, "perplexity": self.perplexity}


def evaluate(model: Any, sequences: Any, values: Any, indices: Any, batch_size: int = 4) -> Evaluation:
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    kl_sum, ce_sum, positions, predictions = 0.0, 0.0, 0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, sequences.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            ids = sequences[rows].to(device)
            if Head.splits(model):  # no full-vocabulary logits: the head over slices of positions
                kl, ce = evaluate_sliced(model, ids, values[rows].to(device), indices[rows].to(device))
                kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
                positions, predictions = positions + ids.numel(), predictions + ids[:, 1:].numel()
                continue
            logits = model(ids).logits.float()
            kl = topk_forward_kl(logits, values[rows].to(device).float(), indices[rows].to(device).long())
            kl_sum += kl.item() * ids.numel()
            positions += ids.numel()
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            ce_sum += ce.item()
            predictions += ids[:, 1:].numel()
    model.train(was_training)
    return Evaluation(kl=kl_sum / max(positions, 1), perplexity=math.exp(ce_sum / max(predictions, 1)))
