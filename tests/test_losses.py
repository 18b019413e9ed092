"""Distillation losses: zero at the teacher, positive otherwise, finite under heavy padding, gradients to the student."""

from __future__ import annotations

import torch

from vldistill.distill import losses
from vldistill.distill.attention import cross_modal_attention, masked_attention
from vldistill.train.objectives import mask_tokens


def _qk(b=2, h=2, n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def test_masked_attention_zero_at_padding_and_rows_sum_to_one():
    q, k = _qk()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    probs = masked_attention(q, k, mask)
    assert (probs[0, :, :, 3:] == 0).all() and (probs[1, :, :, 1:] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))


def test_soft_labels_zero_iff_equal():
    z = torch.randn(4, 3)
    assert losses.soft_labels(z, z, 2.0).abs() < 1e-6
    assert losses.soft_labels(z + torch.randn(4, 3), z, 2.0) > 0


def test_cross_modal_loss_zero_at_teacher_positive_otherwise_and_finite_with_padding():
    q_t, k_t = _qk(n=6, seed=1)
    q_i, k_i = _qk(n=4, seed=2)
    text_mask = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)  # a length-1 row
    image_mask = torch.ones(2, 4, dtype=torch.bool)
    teacher = cross_modal_attention(q_t, k_t, q_i, k_i, text_mask, image_mask)
    assert losses.cross_modal_attention_loss(teacher, teacher, text_mask, image_mask).abs() < 1e-6
    q_s = q_t.clone().requires_grad_(True)
    student = cross_modal_attention(q_s, k_t, q_i + 0.5, k_i, text_mask, image_mask)
    loss = losses.cross_modal_attention_loss(student, [t.detach() for t in teacher], text_mask, image_mask)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(q_s.grad).all() and q_s.grad.abs().sum() > 0
    assert (q_s.grad[0, :, 1:] == 0).all()  # padded text queries get no gradient


def test_mask_tokens_only_real_non_special_tokens():
    torch.manual_seed(0)
    ids = torch.randint(5, 50, (8, 12))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    masked, labels = mask_tokens(ids, mask, mask_id=4, vocab_size=50, special_ids=[0, 1, 2, 3, 4])
    chosen = labels != -100
    assert chosen.any(dim=1).all()
    assert not chosen[:, 0].any() and not chosen[:, 9:].any()
    assert (labels[chosen] == ids[chosen]).all()


def test_vqa_losses_follow_vilt():
    torch.manual_seed(0)
    logits, scores = torch.randn(4, 6), torch.rand(4, 6)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, scores, reduction="sum") / 4
    torch.testing.assert_close(losses.vqa_ground_truth(logits, scores), expected)
    teacher = torch.randn(4, 6)
    at_teacher = losses.vqa_soft_labels(teacher, teacher)
    assert at_teacher < losses.vqa_soft_labels(teacher + torch.randn(4, 6), teacher)
