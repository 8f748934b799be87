"""Distillation losses against independent formulas, their edge cases and the top-k / chunked paths."""

import pytest
import torch
import torch.nn.functional as F

from shrink.compress.distill.losses import (
    TAIDState, chunked_lm_head_loss, forward_kl, get_loss, jsd, reverse_kl, skew_kl, taid, topk_forward_kl,
)
from shrink.errors import ShrinkError

torch.manual_seed(0)
S, T = torch.randn(3, 5, 50, dtype=torch.float64), torch.randn(3, 5, 50, dtype=torch.float64)


def test_forward_and_reverse_kl_match_torch_kl_div():
    # torch's kl_div(input=log q, target=log p, log_target) computes KL(p || q)
    expected_fwd = F.kl_div(F.log_softmax(S, -1), F.log_softmax(T, -1), log_target=True, reduction="none").sum(-1).mean()
    expected_rev = F.kl_div(F.log_softmax(T, -1), F.log_softmax(S, -1), log_target=True, reduction="none").sum(-1).mean()
    assert torch.allclose(forward_kl(S, T), expected_fwd)
    assert torch.allclose(reverse_kl(S, T), expected_rev)


def test_temperature_scales_by_t_squared():
    soft = F.kl_div(F.log_softmax(S / 2, -1), F.log_softmax(T / 2, -1), log_target=True, reduction="none").sum(-1).mean()
    assert torch.allclose(forward_kl(S, T, temperature=2.0), 4 * soft)


@pytest.mark.parametrize("loss", [forward_kl, reverse_kl, jsd, skew_kl])
def test_zero_for_identical_and_positive_otherwise(loss):
    assert loss(T, T).abs() < 1e-12
    assert loss(S, T) > 0


def test_jsd_is_symmetric_at_half_and_bounded_by_log_two():
    assert torch.allclose(jsd(S, T), jsd(T, S))
    assert jsd(S * 100, T * 100) <= torch.log(torch.tensor(2.0, dtype=torch.float64)) + 1e-9


def test_skew_kl_interpolates_between_zero_and_forward_kl():
    assert skew_kl(S, T, alpha=1.0).abs() < 1e-12
    assert torch.allclose(skew_kl(S, T, alpha=0.0), forward_kl(S, T))
    assert 0 < skew_kl(S, T, alpha=0.3) < forward_kl(S, T)


def test_taid_target_moves_from_student_to_teacher_and_state_round_trips():
    assert taid(S, T, TAIDState(lam=0.0)).abs() < 1e-12  # the target is the student itself
    assert torch.allclose(taid(S, T, TAIDState(lam=1.0)), forward_kl(S, T))
    state = TAIDState(lam=0.1)
    for loss in (2.0, 1.5, 1.2, 1.1):
        before = state.lam
        state.update(loss)
        assert before < state.lam <= 1.0
    assert TAIDState.from_dict(state.to_dict()) == state


def test_topk_with_the_whole_vocabulary_is_forward_kl():
    values, indices = torch.topk(torch.log_softmax(T, -1), k=50, dim=-1)
    assert torch.allclose(topk_forward_kl(S, values, indices), forward_kl(S, T))
    few_values, few_indices = torch.topk(torch.log_softmax(T, -1), k=8, dim=-1)
    assert 0 < topk_forward_kl(S, few_values, few_indices) <= forward_kl(S, T)  # a lower bound on the full KL


def test_topk_kl_of_the_teacher_against_its_own_top_k_is_zero():
    # the teacher's mass outside its top 8 is one more outcome, so nothing rewards the student for
    # piling mass onto the 8 (renormalising over them gave the teacher itself a KL above 0)
    values, indices = torch.topk(torch.log_softmax(T, -1), k=8, dim=-1)
    assert topk_forward_kl(T, values, indices).item() == pytest.approx(0, abs=1e-6)
    renormalised = topk_forward_kl(T, values, indices, temperature=1 + 1e-9)
    assert renormalised.item() > 0.01
    sharper = T.clone()
    sharper.scatter_add_(-1, indices, torch.full_like(values, 3.0))  # same top 8, more mass on them
    assert topk_forward_kl(sharper, values, indices) > 0.01


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_chunked_lm_head_loss_equals_the_unchunked_loss_and_gradient(temperature):
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    head = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 7, 50, dtype=torch.float64), -1)
    values, indices = torch.topk(teacher, k=10, dim=-1)
    full = topk_forward_kl(hidden @ head.T, values, indices, temperature)
    grad_full = torch.autograd.grad(full, (hidden, head))
    chunked = chunked_lm_head_loss(hidden, head, values, indices, temperature, chunk=3)
    grad_chunked = torch.autograd.grad(chunked, (hidden, head))
    assert torch.allclose(full, chunked)
    assert all(torch.allclose(a, b) for a, b in zip(grad_full, grad_chunked))


def test_unknown_loss_names_the_known_ones():
    assert get_loss("jsd") is jsd
    with pytest.raises(ShrinkError, match="forward_kl"):
        get_loss("wasserstein")
