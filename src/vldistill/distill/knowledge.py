"""What an encoder pass exposes for distillation (:class:`LayerView`), and the knowledge terms computed from a pair
of views (student, teacher) for every term in ``distill.knowledge`` except ``gt`` and ``soft`` (which compare logits).

A fusion encoder (the teacher, or a small fusion student) runs one joint sequence ``[text; image]``: its view is split
at the text length T. A dual encoder runs two towers: its view joins the text tower's and the image tower's Q/K and
hidden states of the same layer. Either way a view holds, per layer, ``q_text, k_text (B,H,T,D)``,
``q_image, k_image (B,H,I,D)``, ``hidden_text (B,T,D)``, ``hidden_image (B,I,D)``; a fusion view also keeps the
joint Q/K so that its whole joint distribution can be compared with another fusion encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vldistill.distill import losses
from vldistill.distill.attention import capture_hidden, capture_qk, cross_modal_attention, masked_attention

ATTENTION_TERMS = ("attn_cross", "attn_uni", "attn_all", "attn_mse")
STATE_TERMS = ("hidden", "token_nce")


@dataclass
class LayerView:
    """One layer of one encoder pass. ``t2i``/``i2t`` may be given precomputed (cached teacher targets), in which
    case Q/K may be None."""

    q_text: torch.Tensor | None = None
    k_text: torch.Tensor | None = None
    q_image: torch.Tensor | None = None
    k_image: torch.Tensor | None = None
    hidden_text: torch.Tensor | None = None
    hidden_image: torch.Tensor | None = None
    joint: bool = False
    t2i: torch.Tensor | None = None
    i2t: torch.Tensor | None = None

    def cross(self, text_mask, image_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t2i (B,H,T,I), i2t (B,H,I,T))`` recomputed from Q/K (or the cached pair)."""
        if self.t2i is not None:
            return self.t2i, self.i2t
        return cross_modal_attention(self.q_text, self.k_text, self.q_image, self.k_image, text_mask, image_mask)

    def uni(self, text_mask, image_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t2t (B,H,T,T), i2i (B,H,I,I))``."""
        return masked_attention(self.q_text, self.k_text, text_mask), masked_attention(self.q_image, self.k_image, image_mask)

    def whole(self, text_mask, image_mask) -> torch.Tensor:
        """The joint distribution ``(B,H,T+I,T+I)`` over all valid keys (fusion encoders)."""
        q = torch.cat([self.q_text, self.q_image], dim=2)
        k = torch.cat([self.k_text, self.k_image], dim=2)
        return masked_attention(q, k, torch.cat([text_mask, image_mask], dim=1))

    def hidden(self) -> torch.Tensor:
        """``(B, T+I, D)``: text then image token states."""
        return torch.cat([self.hidden_text, self.hidden_image], dim=1)


def fusion_views(layers: nn.ModuleList, run, indices: list[int], num_heads: int, text_len: int,
                 want_states: bool = True) -> tuple[object, dict[int, LayerView]]:
    """Run ``run()`` (one joint pass of a ViLT) while capturing the chosen layers; split each at ``text_len``.

    Returns ``(run's result, {layer: LayerView})``.
    """
    with capture_qk(layers, indices, num_heads) as qk, capture_hidden(layers, indices if want_states else []) as hs:
        result = run()
    views = {}
    for i in indices:
        q, k = qk[i]["q"], qk[i]["k"]
        h = hs.get(i)
        views[i] = LayerView(q[:, :, :text_len], k[:, :, :text_len], q[:, :, text_len:], k[:, :, text_len:],
                             None if h is None else h[:, :text_len], None if h is None else h[:, text_len:], joint=True)
    return result, views


def dual_views(text_qk, text_hidden, image_qk, image_hidden, indices: list[int]) -> dict[int, LayerView]:
    """Join a text-tower and an image-tower capture of the same layers into views."""
    return {i: LayerView(text_qk[i]["q"], text_qk[i]["k"], image_qk[i]["q"], image_qk[i]["k"],
                         text_hidden.get(i), image_hidden.get(i)) for i in indices}


class KnowledgeModules(nn.Module):
    """Trainable parts of the knowledge terms, per student layer that is distilled: ``hidden`` projections
    ``D_s → D_t`` (only when widths differ) and one :class:`~vldistill.distill.losses.TokenNCE` per layer."""

    def __init__(self, knowledge, pairs, student_dim: int, teacher_dim: int, queue_size: int, temperature: float):
        super().__init__()
        self.hidden_proj = nn.ModuleDict()
        self.nce = nn.ModuleDict()
        for s_layer, _ in pairs:
            if "hidden" in knowledge and student_dim != teacher_dim:
                self.hidden_proj[str(s_layer)] = nn.Linear(student_dim, teacher_dim)
            if "token_nce" in knowledge:
                self.nce[str(s_layer)] = losses.TokenNCE(student_dim, teacher_dim, queue_size, temperature)


def _heads_aligned(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]):
    """Attention blocks ``(B,H,Nq,Nk)`` compared head by head when both sides have the same number of heads, else
    averaged over heads first (a distribution still): ``(B,1,Nq,Nk)``."""
    if student[0].shape[1] == teacher[0].shape[1]:
        return student, teacher
    return (tuple(a.mean(dim=1, keepdim=True) for a in student), tuple(b.mean(dim=1, keepdim=True) for b in teacher))


def knowledge_terms(knowledge, pairs, student: list[dict[int, LayerView]], teacher: list[dict[int, LayerView]],
                    text_mask: torch.Tensor, modules: KnowledgeModules | None = None) -> dict[str, torch.Tensor]:
    """Every attention / state term of ``knowledge``, averaged over the image passes (NLVR2: two) and layer pairs.

    ``student[j][s_layer]`` and ``teacher[j][t_layer]`` are the views of image pass ``j``; ``pairs`` lists
    ``(s_layer, t_layer)``. ``attn_all`` is the whole joint distribution when BOTH sides are fusion encoders, else
    cross + uni-modal blocks; ``attn_mse`` is the MSE on the same blocks as ``attn_all``. Attention is compared per
    head when both sides have as many heads, else averaged over heads.
    """
    text_mask = text_mask.bool()
    sums: dict[str, list[torch.Tensor]] = {}
    for s_views, t_views in zip(student, teacher, strict=True):
        for s_layer, t_layer in pairs:
            s, t = s_views[s_layer], t_views[t_layer]
            image_len = s.q_image.shape[2] if s.q_image is not None else s.hidden_image.shape[1]
            image_mask = torch.ones(text_mask.shape[0], image_len, dtype=torch.bool, device=text_mask.device)
            token_mask = torch.cat([text_mask, image_mask], dim=1)
            both_joint = s.joint and t.joint
            if "attn_cross" in knowledge:
                pair = _heads_aligned(s.cross(text_mask, image_mask), t.cross(text_mask, image_mask))
                sums.setdefault("attn_cross", []).append(losses.cross_modal_attention_loss(*pair, text_mask, image_mask))
            if "attn_uni" in knowledge:
                pair = _heads_aligned(s.uni(text_mask, image_mask), t.uni(text_mask, image_mask))
                sums.setdefault("attn_uni", []).append(losses.unimodal_attention_loss(*pair, text_mask, image_mask))
            if "attn_all" in knowledge or "attn_mse" in knowledge:
                if both_joint:
                    s_blocks, t_blocks = [s.whole(text_mask, image_mask)], [t.whole(text_mask, image_mask)]
                    masks = [token_mask]
                else:
                    s_blocks = [*s.cross(text_mask, image_mask), *s.uni(text_mask, image_mask)]
                    t_blocks = [*t.cross(text_mask, image_mask), *t.uni(text_mask, image_mask)]
                    masks = [text_mask, image_mask, text_mask, image_mask]
                s_blocks, t_blocks = _heads_aligned(tuple(s_blocks), tuple(t_blocks))
                if "attn_all" in knowledge:
                    sums.setdefault("attn_all", []).append(sum(
                        losses.attention_kl(a, b, m) for a, b, m in zip(s_blocks, t_blocks, masks, strict=True)))
                if "attn_mse" in knowledge:
                    sums.setdefault("attn_mse", []).append(sum(
                        losses.attention_mse(a, b, m) for a, b, m in zip(s_blocks, t_blocks, masks, strict=True)))
            if "hidden" in knowledge:
                proj = modules.hidden_proj[str(s_layer)] if modules is not None and str(s_layer) in modules.hidden_proj else None
                sums.setdefault("hidden", []).append(losses.hidden_mse(s.hidden(), t.hidden().detach(), token_mask, proj))
            if "token_nce" in knowledge:
                sums.setdefault("token_nce", []).append(modules.nce[str(s_layer)](s.hidden(), t.hidden(), token_mask))
    return {name: torch.stack(values).mean() for name, values in sums.items()}
