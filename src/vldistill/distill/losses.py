"""Distillation losses. Each docstring states what it compares, the equation and the shapes.

Conventions: the teacher is the target distribution; its tensors are detached by the caller (the teacher is frozen),
so gradients reach only the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ground_truth(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``gt``: cross-entropy of the student's logits ``(B, C)`` against integer labels ``(B,)``; mean over B."""
    return F.cross_entropy(student_logits, labels)


def soft_labels(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``soft``: ``τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` averaged over the batch.

    student_logits, teacher_logits ``(B, C)``. Zero iff the two distributions are equal.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """``KL(A_t ‖ A_s)`` summed over keys, averaged over heads and over VALID queries.

    student, teacher ``(B, H, Nq, Nk)`` row-stochastic over valid keys (exactly 0 at padded keys); query_mask
    ``(B, Nq)`` bool. ``Σ_k a_t log(a_t / a_s)`` uses ``xlogy`` and a clamped ``log a_s`` so padded keys (0·log 0) and
    fully padded rows contribute 0, never NaN.
    """
    kl = torch.xlogy(teacher, teacher) - teacher * torch.log(student.clamp_min(1e-12))
    per_query = kl.sum(dim=-1)  # (B, H, Nq)
    weights = query_mask[:, None, :].to(per_query.dtype)  # (B, 1, Nq)
    denom = weights.sum() * per_query.shape[1]
    return (per_query * weights).sum() / denom.clamp_min(1.0)


def cross_modal_attention_loss(student, teacher, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """``attn_cross``: ``KL(t2i_t ‖ t2i_s) + KL(i2t_t ‖ i2t_s)`` (see :func:`attention_kl`).

    ``student`` and ``teacher`` are ``(t2i (B,H,T,I), i2t (B,H,I,T))`` pairs from
    :func:`vldistill.distill.attention.cross_modal_attention`; text queries are averaged over ``text_mask (B,T)``,
    image queries over ``image_mask (B,I)``.
    """
    (s_t2i, s_i2t), (t_t2i, t_i2t) = student, teacher
    return attention_kl(s_t2i, t_t2i, text_mask) + attention_kl(s_i2t, t_i2t, image_mask)
