"""The student's distillation loss without full-vocabulary logits.

A 262,144-token vocabulary makes the logits of one batch of 4 x 128 positions 537 MB in float32, and
the loss holds several tensors of that size (the logits, their log-softmax, their gradient). Here the
student runs up to its last hidden state; the output projection and the loss are computed over slices
of `chunk` positions, each slice's gradient taken at once (with respect to its logits, then to the
hidden states and the head's weight), so only one slice's logits exist at any time, as fused
linear-cross-entropy kernels do. The loss is the same function of the same numbers, summed in another
order: equal to the full computation within floating-point rounding (tests/test_chunked.py).

`StudentLoss` wraps a transformers causal LM as one module whose forward returns the loss, so that
DistributedDataParallel and FSDP2 (compress/distill/parallel.py) see the head's weight used inside
the forward they wrap.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from shrink.compress.distill.losses import TAIDState, get_loss, topk_forward_kl
from shrink.errors import ShrinkError

# logit scalings some families apply after the head: such a model keeps full logits
_UNHANDLED_SCALES = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def dense_teacher(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary teacher logits from its top-k: the rest far below the smallest kept logit, so
    they carry (almost) no probability, as the top-k cache assumes."""
    floor = values.min(dim=-1, keepdim=True).values - 30.0
    dense = floor.expand(*values.shape[:-1], vocab).clone()
    return dense.scatter(-1, indices.long(), values)


def logit_loss(config: Any, logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
               taid_state: TAIDState) -> torch.Tensor:
    """The configured divergence (mean over positions) of student logits from the cached teacher."""
    if config.loss == "forward_kl":
        return topk_forward_kl(logits, values.float(), indices.long(), config.temperature)
    teacher = dense_teacher(values.float(), indices, logits.shape[-1])
    fn = get_loss(config.loss)
    if config.loss == "taid":
        return fn(logits, teacher, taid_state, config.temperature)
    return fn(logits, teacher, config.temperature)


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """The real next token of every position, -100 (ignored) at each sequence's last."""
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    return targets


class Head:
    """A causal LM split into its body (embeddings to the final norm) and its output projection."""

    def __init__(self, model: Any):
        if not self.splits(model):
            raise ShrinkError(f"{type(model).__name__} is not a body and a plain bias-free output projection that "
                              "the sliced distillation loss can split.")
        config = getattr(model.config, "text_config", None) or model.config
        head = model.get_output_embeddings()
        body = getattr(model, model.base_model_prefix, None)
        self.model, self.body, self.head = model, body, head
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @staticmethod
    def splits(model: Any) -> bool:
        """Whether the model is a body plus a plain bias-free nn.Linear head (a fake-quantized head is
        not: its forward is not a product with its weight, so it keeps full logits)."""
        config = getattr(model.config, "text_config", None) or model.config
        if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _UNHANDLED_SCALES):
            return False
        head = model.get_output_embeddings()
        body = getattr(model, model.base_model_prefix, None)
        return (type(head) is torch.nn.Linear and head.bias is None and body is not None and body is not model)

    def tied(self) -> bool:
        """Whether the head's weight is the input embedding's (a plain lookup) and is trained."""
        embedding = self.model.get_input_embeddings()
        return (isinstance(embedding, torch.nn.Embedding) and embedding.weight is self.head.weight
                and self.head.weight.requires_grad)

    @contextmanager
    def sparse_embedding(self) -> Iterator[None]:
        """The embedding lookups made inside give sparse gradients (autograd adds them in place into a
        dense weight.grad that the head's slices have already written)."""
        embedding = self.model.get_input_embeddings()
        before, embedding.sparse = embedding.sparse, True
        try:
            yield
        finally:
            embedding.sparse = before

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's soft cap on the head's output (Gemma's final_logit_softcapping), if any."""
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


class _SlicedHead(torch.autograd.Function):
    """sum over slices of piece(logits of the slice, rows): its gradients with respect to the hidden
    states and the head's weight are computed in the forward pass, one slice at a time.

    With `into` (the scale the caller's backward will give this loss) the head's gradient is added,
    times that scale, straight into weight.grad: no second vocabulary-sized buffer is held until the
    backward reaches the weight (used for a head tied to the embedding, whose own gradient then
    arrives sparse, so autograd adds it into the same tensor in place)."""

    @staticmethod
    def forward(ctx, hidden, weight, head: Head, piece: Callable[..., torch.Tensor], chunk: int, dtype, into):
        w = weight.detach().to(dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight, alpha = None, 1.0
        if ctx.needs_input_grad[1] and into is not None:
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            grad_weight, alpha = weight.grad, into
        elif ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                h = hidden[rows].detach().to(dtype)
                with torch.enable_grad():
                    logits = F.linear(h, w).float().requires_grad_()
                    loss = piece(head.cap(logits), rows)
                (g,) = torch.autograd.grad(loss, logits)
                total += loss.detach().float()
                if grad_hidden is not None:
                    grad_hidden[rows] = (g.to(dtype) @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(g.T.to(grad_weight.dtype), h.to(grad_weight.dtype), alpha=alpha)
                del logits, loss, g
        ctx.into = into if grad_weight is not None else None
        ctx.save_for_backward(grad_hidden, None if into is not None else grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        if ctx.into is not None and not math.isclose(scale.item(), ctx.into, rel_tol=1e-6):
            raise RuntimeError(f"The sliced head loss added its gradient at scale {ctx.into:g} but the backward "
                               f"came at {scale.item():g}.")
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(ctx.weight_dtype)  # in place: one vocabulary-sized buffer
        return grad_hidden, grad_weight, None, None, None, None, None


# the name under which FSDP2 (compress/distill/parallel.shard) registers the sliced loss as a forward method
# of a head that is its own unit: the head's weight is gathered for it and its gradient reduce-scattered
SHARDED_HEAD_LOSS = "shrink_sliced_loss"


def sliced_loss(head: Head, hidden: torch.Tensor, piece: Callable[..., torch.Tensor], chunk: int,
                dtype: torch.dtype | None = None, into: float | None = None) -> torch.Tensor:
    """sum over slices of `chunk` positions of piece(logits [positions, vocab], rows) where hidden is
    [positions, width]; differentiable with respect to hidden and the head's weight (`into`: see
    _SlicedHead)."""
    sharded = getattr(head.head, SHARDED_HEAD_LOSS, None)
    if sharded is not None:
        return sharded(hidden, head, piece, chunk, dtype, into)
    return head_loss(head.head, hidden, head, piece, chunk, dtype, into)


def head_loss(linear: torch.nn.Linear, hidden: torch.Tensor, head: Head, piece: Callable[..., torch.Tensor],
              chunk: int, dtype: torch.dtype | None, into: float | None) -> torch.Tensor:
    """sliced_loss with the weight `linear` holds now (under FSDP2, gathered by the unit's hooks)."""
    weight = linear.weight
    dtype = dtype or weight.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _SlicedHead.apply(hidden, weight, head, piece, chunk, dtype, into)
    total = hidden.new_zeros((), dtype=torch.float32)
    with torch.no_grad():
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            total += piece(head.cap(F.linear(hidden[rows].to(dtype), w).float()), rows)
    return total


class StudentLoss(torch.nn.Module):
    """The student and its distillation loss as one module: forward(ids, values, indices) returns the
    loss (a mean over positions, plus the cross-entropy term when configured) and, when asked, the
    hidden states for the hidden-state term. `chunk` 0 computes full logits as the plain model does."""

    def __init__(self, student: Any, config: Any, taid_state: TAIDState | None = None, chunk: int = 64):
        super().__init__()
        self.student = student
        self.config = config
        self.taid_state = taid_state or TAIDState()
        self.chunk = chunk if Head.splits(student) else 0  # a fake-quantized head keeps full logits
        self.split = Head(student) if self.chunk else None

    def forward(self, ids: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                output_hidden_states: bool = False, grad_scale: float | None = None) -> tuple[torch.Tensor, Any]:
        """`grad_scale`: the factor the caller's backward will put on this loss (the trainer's
        micro-batch weight); given it, a head tied to the embedding adds its gradient straight into
        weight.grad and the embedding's gradient comes sparse (see _SlicedHead)."""
        config = self.config
        if not self.chunk:
            output = self.student(ids, output_hidden_states=output_hidden_states, use_cache=False)
            logits = output.logits.float()
            loss = logit_loss(config, logits, values, indices, self.taid_state)
            if config.ce_weight:
                ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                loss = loss + config.ce_weight * ce
            return loss, output.hidden_states
        into = grad_scale if grad_scale is not None and self.split.tied() and torch.is_grad_enabled() else None
        with self.split.sparse_embedding() if into is not None else nullcontext():
            output = self.split.body(ids, output_hidden_states=output_hidden_states, use_cache=False)
        hidden = output.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        values = values.reshape(-1, values.shape[-1])
        indices = indices.reshape(-1, indices.shape[-1])
        targets = next_tokens(ids).reshape(-1)
        positions, predicted = flat.shape[0], ids.shape[0] * (ids.shape[1] - 1)
        autocast = torch.is_autocast_enabled(ids.device.type)
        dtype = torch.get_autocast_dtype(ids.device.type) if autocast else None

        def piece(logits: torch.Tensor, rows: slice) -> torch.Tensor:
            loss = logit_loss(config, logits, values[rows], indices[rows], self.taid_state) * (logits.shape[0] / positions)
            if config.ce_weight:
                ce = F.cross_entropy(logits, targets[rows], ignore_index=-100, reduction="sum") / max(predicted, 1)
                loss = loss + config.ce_weight * ce
            return loss

        return sliced_loss(self.split, flat, piece, self.chunk, dtype, into), output.hidden_states


def evaluate_sliced(model: Any, ids: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                    chunk: int = 64) -> tuple[float, float]:
    """(sum of the top-k KL over positions, sum of the next-token cross-entropy) of one batch without
    full-vocabulary logits; no gradients."""
    split = Head(model)
    hidden = split.body(ids, use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    values = values.reshape(-1, values.shape[-1]).float()
    indices = indices.reshape(-1, indices.shape[-1]).long()
    targets = next_tokens(ids).reshape(-1)
    sums = {"kl": 0.0, "ce": 0.0}

    def piece(logits: torch.Tensor, rows: slice) -> torch.Tensor:
        sums["kl"] += topk_forward_kl(logits, values[rows], indices[rows]).item() * logits.shape[0]
        sums["ce"] += F.cross_entropy(logits, targets[rows], ignore_index=-100, reduction="sum").item()
        return logits.new_zeros(())

    sliced_loss(split, flat, piece, chunk)
    return sums["kl"], sums["ce"]
