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


def vqa_ground_truth(student_logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``gt`` for VQA (as ViLT): BCE-with-logits against the soft scores ``(B, A)``, summed over answers — i.e. the
    mean over B·A multiplied by the number of answers A."""
    return F.binary_cross_entropy_with_logits(student_logits, scores) * scores.shape[1]


def vqa_soft_labels(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``soft`` for VQA: BCE-with-logits of the student against ``sigmoid(teacher logits)`` ``(B, A)``, summed over
    answers as :func:`vqa_ground_truth`. Minimal (the teacher's own binary entropy) when the logits are equal."""
    return F.binary_cross_entropy_with_logits(student_logits, torch.sigmoid(teacher_logits)) * teacher_logits.shape[1]


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


def unimodal_attention_loss(student, teacher, text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """``attn_uni``: ``KL(t2t_t ‖ t2t_s) + KL(i2i_t ‖ i2i_s)`` over the uni-modal blocks.

    ``student`` and ``teacher`` are ``(t2t (B,H,T,T), i2i (B,H,I,I))`` pairs from
    :func:`vldistill.distill.attention.unimodal_attention`; queries averaged over the valid positions.
    """
    (s_tt, s_ii), (t_tt, t_ii) = student, teacher
    return attention_kl(s_tt, t_tt, text_mask) + attention_kl(s_ii, t_ii, image_mask)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """``attn_mse`` (DistillVLM): ``Σ_k (A_s − A_t)²`` per query row, averaged over heads and VALID queries.

    student, teacher ``(B, H, Nq, Nk)``; query_mask ``(B, Nq)`` bool. Zero iff the rows are equal.
    """
    per_query = (student - teacher).pow(2).sum(dim=-1)  # (B, H, Nq)
    weights = query_mask[:, None, :].to(per_query.dtype)
    return (per_query * weights).sum() / (weights.sum() * per_query.shape[1]).clamp_min(1.0)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, projection=None) -> torch.Tensor:
    """``hidden``: ``mean over valid tokens and features of (W h_s − h_t)²``.

    student ``(B, N, D_s)``, teacher ``(B, N, D_t)``, mask ``(B, N)`` bool; ``projection`` maps ``D_s → D_t`` when the
    widths differ (identity otherwise).
    """
    if projection is not None:
        student = projection(student)
    sq = (student - teacher).pow(2).mean(dim=-1)  # (B, N)
    weights = mask.to(sq.dtype)
    return (sq * weights).sum() / weights.sum().clamp_min(1.0)


class TokenNCE(torch.nn.Module):
    """``token_nce`` (DistillVLM): token-wise noise-contrastive distillation with a FIFO queue of negatives.

    For each valid token n: ``−log exp(s_n·t_n/τ) / (exp(s_n·t_n/τ) + Σ_q exp(s_n·u_q/τ))`` with
    ``s_n = norm(W h_s[n])``, ``t_n = norm(h_t[n])`` and ``u_q`` the L2-normalised teacher token states of past batches
    held in a FIFO queue of ``queue_size`` rows.

    The queue changes once per optimizer step: the teacher keys of every training forward since the last step are
    held back and enqueued by :meth:`step_end`, which the training loop calls after each optimizer step with a
    function that gathers them from every process in rank order. So every micro-batch of a step (and every image
    pass of an NLVR2 example) sees only past steps' keys, and W processes hold the queue one process with the same
    effective batch holds.
    """

    def __init__(self, student_dim: int, teacher_dim: int, queue_size: int, temperature: float):
        super().__init__()
        self.projection = torch.nn.Linear(student_dim, teacher_dim)
        self.temperature = temperature
        self.register_buffer("queue", torch.zeros(queue_size, teacher_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))
        self.pending: list[torch.Tensor] = []  # keys of this optimizer step's forwards, not yet enqueued

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Append ``keys (N, D_t)`` (already normalised) first-in-first-out; only the newest ``queue_size`` are kept."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        n, ptr = keys.shape[0], int(self.queue_ptr)
        idx = (torch.arange(n, device=keys.device) + ptr) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)
        self.queue_len.fill_(min(size, int(self.queue_len) + n))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """student ``(B, N, D_s)``, teacher ``(B, N, D_t)``, mask ``(B, N)`` bool → mean NCE over valid tokens."""
        s = F.normalize(self.projection(student[mask]), dim=-1)  # (M, D_t)
        t = F.normalize(teacher[mask].detach(), dim=-1)
        positive = (s * t).sum(dim=-1, keepdim=True)  # (M, 1)
        negatives = s @ self.queue[: int(self.queue_len)].clone().T  # (M, Q); a copy: step_end changes the queue
        logits = torch.cat([positive, negatives], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        if self.training:
            self.pending.append(t.detach())
        return loss

    @torch.no_grad()
    def step_end(self, gather=None) -> None:
        """Enqueue the keys held back since the last optimizer step, in forward order; ``gather(keys (N, D_t))`` →
        ``(N_all, D_t)`` joins every process's keys in rank order (``None``: one process)."""
        if not self.pending:
            return
        keys = torch.cat(self.pending)
        self.pending = []
        self.enqueue(keys if gather is None else gather(keys))
