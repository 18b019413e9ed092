"""Attention capture and the attention distributions that distillation compares.

Q and K come from forward hooks on the query/key projections of ViLT layers (``attention.attention.query`` and
``.key`` in transformers), so nothing inside transformers is modified. Distributions are recomputed from Q and K, as
DiDE does, rather than sliced out of the joint softmax: for the teacher the joint sequence is split at the text
length T, for the dual student Q and K come from its two towers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def capture_qk(layers: list[nn.Module], indices: list[int], num_heads: int) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Record Q and K of the chosen ViLT layers while the block runs.

    ``layers`` is the ModuleList of ``ViltLayer`` (``encoder.layer``); yields ``{layer: {"q": (B,H,N,D), "k": (B,H,N,D)}}``,
    filled by the forward passes made inside the ``with`` block (the last pass wins).
    """
    captured: dict[int, dict[str, torch.Tensor]] = {i: {} for i in indices}
    handles = []

    def hook(layer: int, name: str):
        def fn(_module, _inputs, output):
            b, n, _ = output.shape
            captured[layer][name] = output.view(b, n, num_heads, -1).transpose(1, 2)
        return fn

    try:
        for i in indices:
            attn = layers[i].attention.attention
            handles.append(attn.query.register_forward_hook(hook(i, "q")))
            handles.append(attn.key.register_forward_hook(hook(i, "k")))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def masked_attention(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """``softmax(q·kᵀ/√D)`` over the valid keys only.

    q ``(B,H,Nq,D)``, k ``(B,H,Nk,D)``, key_mask ``(B,Nk)`` bool (True = real token) → ``(B,H,Nq,Nk)``, exactly 0 at
    padded keys. A row whose keys are all padded is all zeros (never NaN).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    valid = key_mask[:, None, None, :].to(torch.bool)
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    return probs.masked_fill(~valid, 0.0)


def cross_modal_attention(q_text, k_text, q_image, k_image, text_mask, image_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-modal attention distributions recomputed from Q and K.

    q_text, k_text ``(B,H,T,D)``; q_image, k_image ``(B,H,I,D)``; text_mask ``(B,T)``, image_mask ``(B,I)`` bool.
    Returns ``t2i (B,H,T,I) = softmax_valid-image-keys(q_text·k_imageᵀ/√D)`` and
    ``i2t (B,H,I,T) = softmax_valid-text-keys(q_image·k_textᵀ/√D)``.
    """
    t2i = masked_attention(q_text, k_image, image_mask)
    i2t = masked_attention(q_image, k_text, text_mask)
    return t2i, i2t


def unimodal_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Uni-modal attention ``(B,H,N,N) = softmax_valid-keys(q·kᵀ/√D)``; q, k ``(B,H,N,D)``, mask ``(B,N)`` bool."""
    return masked_attention(q, k, mask)


def split_joint(qk: dict[str, torch.Tensor], text_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fusion encoder's joint Q/K ``(B,H,T+I,D)`` at the text length: ``(q_text, k_text, q_image, k_image)``."""
    q, k = qk["q"], qk["k"]
    return q[:, :, :text_len], k[:, :, :text_len], q[:, :, text_len:], k[:, :, text_len:]


@contextmanager
def capture_hidden(layers: list[nn.Module], indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output hidden states ``(B, N, D)`` of the chosen ViLT layers while the block runs."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook(layer: int):
        def fn(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return fn

    try:
        for i in indices:
            handles.append(layers[i].register_forward_hook(hook(i)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def layer_pairs(student_layers: int, teacher_layers: int, mode: str) -> list[tuple[int, int]]:
    """Which student layer learns from which teacher layer.

    ``last``: the last layer of each; ``layerwise``: uniform mapping, student layer ``i`` ↔ teacher layer
    ``round((i + 1) · L_t / L_s) − 1`` (identity when the depths are equal).
    """
    if mode == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    if mode == "layerwise":
        return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]
    raise ValueError(f"distill.layers={mode!r}: expected 'last' or 'layerwise'")
