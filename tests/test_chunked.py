"""The distillation loss over slices of positions equals the loss on full logits: values and gradients."""

import copy

import pytest
import torch

from shrink.compress.distill.chunked import Head, StudentLoss
from shrink.compress.distill.evaluate import evaluate
from shrink.compress.distill.losses import TAIDState
from shrink.compress.distill.trainer import DistillConfig, distill

IDS = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(3))


def _teacher_topk(k=12):
    logits = torch.randn(3, 11, 101, generator=torch.Generator().manual_seed(4)) * 3
    top = torch.log_softmax(logits, -1).topk(k, -1)
    return top.values, top.indices.int()


def _loss_and_grads(model, config, chunk):
    values, indices = _teacher_topk()
    module = StudentLoss(model, config, TAIDState(lam=0.3), chunk)
    model.zero_grad(set_to_none=True)
    loss, _ = module(IDS, values, indices)
    (loss * 0.7).backward()  # a scale on the loss reaches both gradients
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,loss,temperature,ce", [
    ("gemma3", "forward_kl", 1.0, 0.0), ("gemma3", "forward_kl", 2.0, 0.5), ("llama", "reverse_kl", 1.0, 0.0),
    ("llama", "jsd", 1.5, 0.0), ("qwen2", "skew_kl", 1.0, 0.3), ("qwen2", "taid", 1.0, 0.0),
])
def test_sliced_loss_equals_the_full_logit_loss_and_its_gradients(tiny_model, family, loss, temperature, ce):
    model = tiny_model(family).model.train()
    if family == "gemma3":
        model.config.final_logit_softcapping = 5.0  # the cap is applied to every slice too
    config = DistillConfig(loss=loss, temperature=temperature, ce_weight=ce)
    full, full_grads = _loss_and_grads(model, config, 0)
    sliced, sliced_grads = _loss_and_grads(model, config, 4)  # 33 positions: slices of 4 and a last one of 1
    assert torch.allclose(full, sliced, rtol=1e-6, atol=1e-7)  # float32 logits in both
    assert full_grads.keys() == sliced_grads.keys()
    for name in full_grads:
        assert torch.allclose(full_grads[name], sliced_grads[name], rtol=1e-4, atol=1e-7), name


def test_training_with_sliced_logits_gives_the_full_logit_student(tiny_model, tmp_path):
    teacher = tiny_model("gemma3").model  # tied embeddings: the head's gradient joins the embedding's
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    values, indices = _teacher_topk()
    runs = {}
    for chunk in (0, 5):
        model = copy.deepcopy(student)
        config = DistillConfig(lr=3e-3, steps=4, batch_size=2, top_k=12, logit_chunk=chunk, checkpoint_every=4)
        report = distill(model, IDS, (values, indices), config, tmp_path / str(chunk), IDS, (values, indices))
        runs[chunk] = (report, model.state_dict())
    (full, full_weights), (sliced, sliced_weights) = runs[0], runs[5]
    assert sliced.losses == pytest.approx(full.losses, rel=1e-5)
    assert sliced.eval_before["kl"] == pytest.approx(full.eval_before["kl"], rel=1e-5)
    assert sliced.eval_after["perplexity"] == pytest.approx(full.eval_after["perplexity"], rel=1e-5)
    # AdamW divides by sqrt(v): a rounding difference in a near-zero gradient element moves that weight by a
    # fraction of the learning rate (1.1e-5 measured here); a hundredth of one step's lr bounds it
    for name, tensor in full_weights.items():
        assert torch.allclose(tensor, sliced_weights[name], atol=3e-3 / 100), name


def test_evaluation_without_full_logits_equals_the_full_one(tiny_model, monkeypatch):
    model = tiny_model("llama").model
    values, indices = _teacher_topk()
    sliced = evaluate(model, IDS, values, indices, batch_size=2)
    monkeypatch.setattr(Head, "splits", staticmethod(lambda model: False))
    full = evaluate(model, IDS, values, indices, batch_size=2)
    assert sliced.kl == pytest.approx(full.kl, rel=1e-6)
    assert sliced.perplexity == pytest.approx(full.perplexity, rel=1e-6)


def test_a_fake_quantized_head_keeps_full_logits(tiny_model):
    from shrink.compress.quant.fakequant import FakeQuantLinear

    model = tiny_model("llama").model
    model.lm_head = FakeQuantLinear(model.lm_head, "int8")
    assert StudentLoss(model, DistillConfig()).chunk == 0


def test_activation_checkpointing_gives_the_same_student(tiny_model, tmp_path):
    model = tiny_model("llama").model
    values, indices = _teacher_topk()
    weights = []
    for checkpointing in (False, True):
        trained = copy.deepcopy(model)
        config = DistillConfig(lr=3e-3, steps=3, batch_size=3, top_k=12, activation_checkpointing=checkpointing)
        distill(trained, IDS, (values, indices), config, tmp_path / str(checkpointing))
        assert not trained.is_gradient_checkpointing  # switched off again after training
        weights.append(trained.state_dict())
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-6), name
