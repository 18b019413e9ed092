"""The loss of each training stage, as ``loss_fn(model, batch) -> {"loss": total, <term>: value, ...}``.

:class:`Objective` wraps a model and its loss function into one ``nn.Module`` whose ``forward`` Fabric sees, so
precision, DDP and gradient sync apply to the whole computation. A frozen teacher is never a submodule: it is held
outside (no gradients, not in the optimizer, not in the saved state).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vldistill.config import DistillParams
from vldistill.distill import losses
from vldistill.distill.attention import capture_hidden, capture_qk, layer_pairs
from vldistill.distill.knowledge import (ATTENTION_TERMS, STATE_TERMS, KnowledgeModules, LayerView, dual_views,
                                         fusion_views, knowledge_terms)
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher


class Objective(nn.Module):
    """``forward(batch)`` = ``loss_fn(self.model, batch)``; ``self.model`` is what gets trained and saved.

    ``extras`` holds trainable parts of the loss that are not the model (projections, NCE queues): they are
    optimised with it but not saved with it.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], dict[str, torch.Tensor]],
                 extras: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.extras = extras

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.loss_fn(self.model, batch)


# ------------------------------------------------------------------------------------------------ teacher
def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                special_ids: list[int], prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``prob`` of the real, non-special tokens; of those 80% → [MASK], 10% → random, 10% kept.

    Returns ``(masked_ids (B,T), labels (B,T))`` with labels −100 where nothing is predicted. At least one token per
    row is chosen when the row has any maskable token.
    """
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))
    chosen = (torch.rand(input_ids.shape, device=input_ids.device) < prob) & maskable
    none = ~chosen.any(dim=1) & maskable.any(dim=1)
    if none.any():  # force one masked token in rows that drew none
        scores = torch.rand(input_ids.shape, device=input_ids.device).masked_fill(~maskable, -1.0)
        first = scores.argmax(dim=1)
        chosen[none, first[none]] = True
    labels = input_ids.masked_fill(~chosen, -100)
    roll = torch.rand(input_ids.shape, device=input_ids.device)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    random_words = torch.randint(len(special_ids), vocab_size, input_ids.shape, device=input_ids.device)
    replace = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[replace] = random_words[replace]
    return masked, labels


def itm_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each example's image with the previous example's (in-batch roll) with probability 0.5.

    Returns ``(pixel_values (B,3,H,W), itm_labels (B,), swapped (B,) bool)``; the label is 1 when the image still
    belongs to the text (also when the rolled-in image happens to be the same image).
    """
    pixels, keys = batch["pixel_values"], batch["image"]
    swap = torch.rand(len(keys), device=pixels.device) < 0.5
    rolled_pixels, rolled_keys = pixels.roll(1, dims=0), keys.roll(1, dims=0)
    mixed = torch.where(swap[:, None, None, None], rolled_pixels, pixels)
    labels = (~swap | (rolled_keys == keys)).long()
    return mixed, labels, swap


def teacher_pretrain_loss(mask_id: int, vocab_size: int, special_ids: list[int]):
    """MLM (15% masking, true image) + ITM (image replaced with probability 0.5), as ViLT's pre-training."""

    def loss_fn(model: ViltTeacher, batch: dict) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        masked, labels = mask_tokens(ids, mask, mask_id, vocab_size, special_ids)
        sequence, _ = model.encode(masked, mask, batch["pixel_values"])
        mlm_logits = model.mlm_logits(sequence, ids.shape[1])
        mlm = nn.functional.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        pixels, itm_labels, _ = itm_pairs(batch)
        _, pooled = model.encode(ids, mask, pixels)
        itm = nn.functional.cross_entropy(model.itm_logits(pooled), itm_labels)
        return {"loss": mlm + itm, "mlm": mlm, "itm": itm}

    return loss_fn


def nlvr2_gt_loss(model, batch: dict) -> dict[str, torch.Tensor]:
    """Cross-entropy of NLVR2 logits; works for the teacher and for the dual encoder (same ``nlvr2_logits``)."""
    logits = model.nlvr2_logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values_left"],
                                batch["pixel_values_right"])
    ce = losses.ground_truth(logits, batch["labels"])
    return {"loss": ce, "gt": ce}


# -------------------------------------------------------------------------------------------- distillation
def distill_pairs(recipe: DistillParams, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` pairs for ``distill.layers`` (see :func:`layer_pairs`)."""
    return layer_pairs(student_layers, teacher_layers, recipe.layers)


def needs_views(knowledge) -> bool:
    return bool(set(knowledge) & {*ATTENTION_TERMS, *STATE_TERMS})


def fusion_nlvr2_outputs(model: ViltTeacher, batch: dict, layers: list[int], views: bool, states: bool = True) -> dict:
    """NLVR2 through a fusion encoder (the teacher, or a small fusion student): two joint passes (image types 1, 2),
    pooled outputs concatenated → ``logits (B,2)``; when ``views``, one ``{layer: LayerView}`` per image pass (Q/K
    and hidden states of the joint sequence, split at the text length)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads, text_len = model.config.num_attention_heads, ids.shape[1]
    pooled, all_views = [], []
    for side, type_idx in (("pixel_values_left", 1), ("pixel_values_right", 2)):
        (_, p), v = fusion_views(model.vilt.encoder.layer,
                                 lambda side=side, t=type_idx: model.encode(ids, mask, batch[side], image_token_type_idx=t),
                                 layers if views else [], heads, text_len, want_states=states)
        pooled.append(p)
        all_views.append(v)
    return {"logits": model.classifier(torch.cat(pooled, dim=-1)), "views": all_views}


@torch.no_grad()
def teacher_nlvr2_targets(teacher: ViltTeacher, batch: dict, layers: list[int], views: bool,
                          states: bool = True) -> dict:
    """The frozen teacher's NLVR2 knowledge for a batch (no gradients): see :func:`fusion_nlvr2_outputs`."""
    return fusion_nlvr2_outputs(teacher, batch, layers, views, states)


def student_nlvr2_outputs(student, batch: dict, layers: list[int], views: bool) -> dict:
    """A student's NLVR2 logits ``(B,2)`` and, when ``views``, its ``{layer: LayerView}`` per image pass.

    Dual encoder: text tower once, image tower per image; its view joins the text tower's and the image tower's
    Q/K and states (what DiDE aligns with the teacher). Fusion student: two joint passes, as the teacher.
    """
    if isinstance(student, ViltTeacher):  # small fusion student
        return fusion_nlvr2_outputs(student, batch, layers, views)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads = student.config.num_attention_heads
    wanted = layers if views else []
    with capture_qk(student.text.layer, wanted, heads) as text_qk, capture_hidden(student.text.layer, wanted) as text_h:
        text = student.encode_text(ids, mask)
    images, all_views = [], []
    for side, type_idx in (("pixel_values_left", 1), ("pixel_values_right", 2)):
        with capture_qk(student.image.layer, wanted, heads) as image_qk, \
                capture_hidden(student.image.layer, wanted) as image_h:
            images.append(student.encode_image(batch[side], type_idx))
        all_views.append(dual_views(text_qk, text_h, image_qk, image_h, wanted))
    logits = student.nlvr2_from_cls(text.cls, images[0].cls, images[1].cls)
    return {"logits": logits, "views": all_views}


def dide_nlvr2_loss(recipe: DistillParams, pairs: list[tuple[int, int]], teacher_fn: Callable[[dict], dict] | None,
                    modules: KnowledgeModules | None = None):
    """Fine-tuning distillation on NLVR2: ``Σ_k w_k L_k`` over ``recipe.knowledge`` with

    - ``gt``: CE(student logits, labels);
    - ``soft``: τ²·KL(teacher ‖ student) of the pair logits;
    - attention / state terms (``attn_cross``, ``attn_uni``, ``attn_all``, ``attn_mse``, ``hidden``, ``token_nce``):
      :func:`vldistill.distill.knowledge.knowledge_terms` on each image pass and layer pair, averaged.

    ``teacher_fn(batch)`` returns the teacher's targets (cached per example or computed on the fly).
    """
    knowledge = set(recipe.knowledge)
    student_layers = sorted({s for s, _ in pairs})
    weights = recipe.weights
    views = needs_views(knowledge)

    def loss_fn(student, batch: dict) -> dict[str, torch.Tensor]:
        out = student_nlvr2_outputs(student, batch, student_layers, views)
        terms: dict[str, torch.Tensor] = {}
        if "gt" in knowledge:
            terms["gt"] = losses.ground_truth(out["logits"], batch["labels"])
        target = teacher_fn(batch) if knowledge - {"gt"} else None
        if "soft" in knowledge:
            terms["soft"] = losses.soft_labels(out["logits"], target["logits"], recipe.temperature)
        if views:
            terms |= knowledge_terms(knowledge, pairs, out["views"], target["views"], batch["attention_mask"], modules)
        terms["loss"] = sum(getattr(weights, k) * v for k, v in terms.items())
        return terms

    return loss_fn


def dual_pretrain_loss(recipe: DistillParams, layers: list[int], teacher: ViltTeacher | None):
    """Minimal DiDE pre-training distillation on image–caption pairs (the dual student has the teacher's depth:
    student layer l learns from teacher layer l):

    - ITC: symmetric in-batch contrastive CE over ``itc_logits`` (learnable temperature);
    - ITM: CE of ``itm_score(fuse(text, image))`` on matched pairs and in-batch rolled negatives (``gt``);
    - ``soft``: τ²·KL(teacher ITM ‖ student ITM) on the same pairs;
    - ``attn_cross``: cross-modal attention KL at the chosen layers on the matched pairs only.
    """
    knowledge = set(recipe.knowledge)
    weights = recipe.weights
    use_attn = "attn_cross" in knowledge and teacher is not None
    wanted = layers if use_attn else []

    def loss_fn(student: DualEncoder, batch: dict) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        heads = student.config.num_attention_heads
        with capture_qk(student.text.layer, wanted, heads) as text_qk:
            text = student.encode_text(ids, mask)
        with capture_qk(student.image.layer, wanted, heads) as image_qk:
            image = student.encode_image(batch["pixel_values"], 1)
        logits = student.itc_logits(text.cls, image.cls)
        same = (batch["image"][:, None] == batch["image"][None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)  # captions of the same image are all positives
        itc = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets.T)) / 2
        pixels, itm_labels, swapped = itm_pairs(batch)
        neg_cls = torch.where(swapped[:, None], image.cls.roll(1, dims=0), image.cls)
        itm_logits = student.itm_score(student.fuse(text.cls, neg_cls))
        terms = {"itc": itc, "gt": nn.functional.cross_entropy(itm_logits, itm_labels)}
        if teacher is not None and knowledge & {"soft", "attn_cross"}:
            with torch.no_grad():
                _, pooled = teacher.encode(ids, mask, pixels)
                teacher_itm = teacher.itm_logits(pooled)
            if "soft" in knowledge:
                terms["soft"] = losses.soft_labels(itm_logits, teacher_itm, recipe.temperature)
            if use_attn:  # matched pairs only: the teacher sees each caption with its own image
                with torch.no_grad():
                    _, t_views = fusion_views(teacher.vilt.encoder.layer,
                                              lambda: teacher.encode(ids, mask, batch["pixel_values"]),
                                              layers, heads, ids.shape[1], want_states=False)
                s_views = dual_views(text_qk, {}, image_qk, {}, layers)
                terms |= knowledge_terms({"attn_cross"}, [(layer, layer) for layer in layers], [s_views], [t_views],
                                         mask)
        terms["loss"] = terms["itc"] + sum(getattr(weights, k) * v for k, v in terms.items() if k != "itc")
        return terms

    return loss_fn


CACHEABLE = {"gt", "soft", "attn_cross"}
"""Knowledge whose teacher targets are small enough to precompute for a whole split (logits + t2i/i2t maps)."""


@torch.no_grad()
def cache_teacher_targets(teacher: ViltTeacher, split, layers: list[int], attention: bool, batch_size: int,
                          device: torch.device) -> Callable[[dict], dict]:
    """Run the frozen teacher (eval mode) once over a split and return ``teacher_fn(batch)`` that looks its targets
    up by ``batch["index"]``: logits and, when ``attention``, each layer's and image pass's cross-modal maps
    ``t2i (N,H,T,I)``, ``i2t (N,H,I,T)`` (float16, to halve the memory). Exact for a deterministic teacher and
    unaugmented inputs; only for knowledge within :data:`CACHEABLE`."""
    teacher.eval()
    logits, maps = [], {(side, layer): ([], []) for side in (0, 1) for layer in layers}
    for batch in split.loader(batch_size, shuffle=False, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = teacher_nlvr2_targets(teacher, batch, layers, attention, states=False)
        logits.append(out["logits"].float().cpu())
        for side, views in enumerate(out["views"]):
            for layer, view in views.items():
                image_mask = torch.ones(view.q_image.shape[:1] + view.q_image.shape[2:3], dtype=torch.bool, device=device)
                t2i, i2t = view.cross(batch["attention_mask"].bool(), image_mask)
                maps[side, layer][0].append(t2i.to(torch.float16).cpu())
                maps[side, layer][1].append(i2t.to(torch.float16).cpu())
    table_logits = torch.cat(logits)
    table_maps = {key: (torch.cat(a), torch.cat(b)) for key, (a, b) in maps.items() if a}

    def teacher_fn(batch: dict) -> dict:
        idx = batch["index"].cpu()
        dev = batch["input_ids"].device
        views = [{}, {}]
        for (side, layer), (t2i, i2t) in table_maps.items():
            views[side][layer] = LayerView(t2i=t2i[idx].to(dev).float(), i2t=i2t[idx].to(dev).float())
        return {"logits": table_logits[idx].to(dev), "views": views}

    return teacher_fn
