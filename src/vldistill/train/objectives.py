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
from vldistill.train import tasks


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


def teacher_task_loss(task: str, negatives: int = 3):
    """Fine-tuning loss of a fusion encoder (the teacher) on ``task``: ``gt`` of :func:`tasks.ground_truth` on the
    task logits; retrieval: :func:`rank_ground_truth`, CE over the rank scores of each caption with its own image and
    ``negatives`` hard-negative images, and of each image with its own caption and ``negatives`` hard-negative
    captions (ViLT's IRTR ranks false texts per image; both directions are scored at test)."""

    def loss_fn(model, batch: dict) -> dict[str, torch.Tensor]:
        if task == "retrieval":
            ce = rank_ground_truth(fusion_rank_outputs(model, batch, tasks.candidates(batch, negatives), [], False))
        else:
            ce = tasks.ground_truth(fusion_outputs(model, batch, [], False)["logits"], batch)
        return {"loss": ce, "gt": ce}

    return loss_fn


# -------------------------------------------------------------------------------------------- distillation
def distill_pairs(recipe: DistillParams, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``(student layer, teacher layer)`` pairs for ``distill.layers`` (see :func:`layer_pairs`)."""
    return layer_pairs(student_layers, teacher_layers, recipe.layers)


def needs_views(knowledge) -> bool:
    return bool(set(knowledge) & {*ATTENTION_TERMS, *STATE_TERMS})


def fusion_outputs(model: ViltTeacher, batch: dict, layers: list[int], views: bool, states: bool = True) -> dict:
    """A task through a fusion encoder (the teacher, or a small fusion student): one joint pass per image (NLVR2: two,
    image types 1 and 2, pooled outputs concatenated) → ``classifier`` → ``logits (B, C)``; when ``views``, one
    ``{layer: LayerView}`` per image pass (Q/K and hidden states of the joint sequence, split at the text length)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads, text_len = model.config.num_attention_heads, ids.shape[1]
    pooled, all_views = [], []
    for key, type_idx in tasks.image_passes(batch):
        (_, p), v = fusion_views(model.vilt.encoder.layer,
                                 lambda key=key, t=type_idx: model.encode(ids, mask, batch[key], image_token_type_idx=t),
                                 layers if views else [], heads, text_len, want_states=states)
        pooled.append(p)
        all_views.append(v)
    return {"logits": model.classifier(torch.cat(pooled, dim=-1)), "views": all_views}


@torch.no_grad()
def teacher_targets(teacher: ViltTeacher, batch: dict, layers: list[int], views: bool, states: bool = True) -> dict:
    """The frozen teacher's knowledge for a batch (no gradients): see :func:`fusion_outputs`."""
    return fusion_outputs(teacher, batch, layers, views, states)


def student_outputs(student, batch: dict, layers: list[int], views: bool) -> dict:
    """A student's task logits ``(B, C)`` and, when ``views``, its ``{layer: LayerView}`` per image pass.

    Dual encoder: text tower once, image tower per image; its view joins the text tower's and the image tower's
    Q/K and states (what DiDE aligns with the teacher). Fusion student: joint passes, as the teacher.
    """
    if isinstance(student, ViltTeacher):  # small fusion student
        return fusion_outputs(student, batch, layers, views)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads = student.config.num_attention_heads
    wanted = layers if views else []
    with capture_qk(student.text.layer, wanted, heads) as text_qk, capture_hidden(student.text.layer, wanted) as text_h:
        text = student.encode_text(ids, mask)
    images, all_views = [], []
    for key, type_idx in tasks.image_passes(batch):
        with capture_qk(student.image.layer, wanted, heads) as image_qk, \
                capture_hidden(student.image.layer, wanted) as image_h:
            images.append(student.encode_image(batch[key], type_idx))
        all_views.append(dual_views(text_qk, text_h, image_qk, image_h, wanted))
    if len(images) == 2:
        logits = student.nlvr2_from_cls(text.cls, images[0].cls, images[1].cls)
    else:
        logits = student.classify_from_cls(text.cls, images[0].cls)
    return {"logits": logits, "views": all_views}


def _weighted(terms: dict[str, torch.Tensor], weights) -> dict[str, torch.Tensor]:
    terms["loss"] = sum(getattr(weights, k, 1.0) * v for k, v in terms.items())
    return terms


def dide_loss(recipe: DistillParams, pairs: list[tuple[int, int]], teacher_fn: Callable[[dict], dict] | None,
              modules: KnowledgeModules | None = None):
    """Fine-tuning distillation on a classification task (nlvr2, snli_ve, vqa): ``Σ_k w_k L_k`` over
    ``recipe.knowledge`` with

    - ``gt``: :func:`tasks.ground_truth` of the student logits (CE, or VQA's BCE on soft scores);
    - ``soft``: :func:`tasks.soft_labels` (τ²·KL(teacher ‖ student), or VQA's BCE against the teacher's sigmoid);
    - attention / state terms (``attn_cross``, ``attn_uni``, ``attn_all``, ``attn_mse``, ``hidden``, ``token_nce``):
      :func:`vldistill.distill.knowledge.knowledge_terms` on each image pass and layer pair, averaged.

    ``teacher_fn(batch)`` returns the teacher's targets (cached per example or computed on the fly).
    """
    knowledge = set(recipe.knowledge)
    student_layers = sorted({s for s, _ in pairs})
    views = needs_views(knowledge)

    def loss_fn(student, batch: dict) -> dict[str, torch.Tensor]:
        out = student_outputs(student, batch, student_layers, views)
        terms: dict[str, torch.Tensor] = {}
        if "gt" in knowledge:
            terms["gt"] = tasks.ground_truth(out["logits"], batch)
        target = teacher_fn(batch) if knowledge - {"gt"} else None
        if "soft" in knowledge:
            terms["soft"] = tasks.soft_labels(out["logits"], target["logits"], batch, recipe.temperature)
        if views:
            terms |= knowledge_terms(knowledge, pairs, out["views"], target["views"], batch["attention_mask"], modules)
        return _weighted(terms, recipe.weights)

    return loss_fn


# --------------------------------------------------------------------------------------------------- retrieval
def fusion_rank_outputs(model: ViltTeacher, batch: dict, cands: torch.Tensor, layers: list[int], views: bool,
                        states: bool = True) -> dict:
    """Rank scores of a fusion encoder in both retrieval directions over the candidates ``cands (B, 1+K)`` (row b
    itself first, then its K hard negatives, :func:`tasks.candidates`):

    - ``scores (B, 1+K)``: caption b against image b and the images of rows ``cands[b, 1:]`` (image retrieval);
    - ``scores_tr (B, 1+K)``: image b against caption b and the captions of rows ``cands[b, 1:]`` (text retrieval);

    column 0 of both is the same matched pass. ``views`` of the matched pass only (``[{layer: LayerView}]``).
    """
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    heads, text_len = model.config.num_attention_heads, ids.shape[1]
    (_, pooled), matched_views = fusion_views(model.vilt.encoder.layer, lambda: model.encode(ids, mask, pixels),
                                              layers if views else [], heads, text_len, want_states=states)
    negatives = cands[:, 1:].flatten()
    k = cands.shape[1] - 1
    _, other_images = model.encode(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), pixels[negatives])
    _, other_texts = model.encode(ids[negatives], mask[negatives], pixels.repeat_interleave(k, 0))
    matched = model.rank_output(pooled)
    return {"scores": torch.cat([matched, model.rank_output(other_images).view(len(ids), k)], dim=1),
            "scores_tr": torch.cat([matched, model.rank_output(other_texts).view(len(ids), k)], dim=1),
            "views": [matched_views]}


def rank_ground_truth(out: dict) -> torch.Tensor:
    """``gt`` of retrieval: mean of the CE of ``scores`` and of ``scores_tr`` ``(B, 1+K)``, the positive in column 0."""
    positive = torch.zeros(len(out["scores"]), dtype=torch.long, device=out["scores"].device)
    return (losses.ground_truth(out["scores"], positive) + losses.ground_truth(out["scores_tr"], positive)) / 2


def rank_soft_labels(student: dict, teacher: dict, temperature: float) -> torch.Tensor:
    """``soft`` of retrieval: mean over both directions of τ²·KL(teacher ‖ student) of ``scores`` / ``scores_tr``."""
    return (losses.soft_labels(student["scores"], teacher["scores"], temperature)
            + losses.soft_labels(student["scores_tr"], teacher["scores_tr"], temperature)) / 2


def retrieval_distill_loss(recipe: DistillParams, pairs: list[tuple[int, int]], teacher: ViltTeacher | None,
                           negatives: int, modules: KnowledgeModules | None = None):
    """Fine-tuning distillation on image–text retrieval. Each caption is scored against its own image and
    ``negatives`` hard-negative images from the batch, and each image against its own caption and ``negatives``
    hard-negative captions (:func:`tasks.candidates`, :func:`fusion_rank_outputs`), by the teacher (rank scores) and
    by the student:

    - dual encoder: ``gt`` = symmetric in-batch contrastive CE of ``itc_logits`` (captions of the same image are all
      positives); ``soft`` = :func:`rank_soft_labels`, τ²·KL(softmax teacher scores ‖ softmax student similarities)
      over the candidates, both directions;
    - fusion student: ``gt`` = :func:`rank_ground_truth` (both directions, positive first); ``soft`` as above;
    - attention / state terms on the matched pairs only (the teacher would be quadratic otherwise).
    """
    knowledge = set(recipe.knowledge)
    student_layers = sorted({s for s, _ in pairs})
    teacher_layers = sorted({t for _, t in pairs})
    views = needs_views(knowledge)

    def loss_fn(student, batch: dict) -> dict[str, torch.Tensor]:
        cands = tasks.candidates(batch, negatives)
        terms: dict[str, torch.Tensor] = {}
        if isinstance(student, ViltTeacher):
            out = fusion_rank_outputs(student, batch, cands, student_layers, views)
            s_views = out["views"]
            if "gt" in knowledge:
                terms["gt"] = rank_ground_truth(out)
        else:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            heads, wanted = student.config.num_attention_heads, student_layers if views else []
            with capture_qk(student.text.layer, wanted, heads) as text_qk, \
                    capture_hidden(student.text.layer, wanted) as text_h:
                text = student.encode_text(ids, mask)
            with capture_qk(student.image.layer, wanted, heads) as image_qk, \
                    capture_hidden(student.image.layer, wanted) as image_h:
                image = student.encode_image(batch["pixel_values"], 1)
            s_views = [dual_views(text_qk, text_h, image_qk, image_h, wanted)]
            itc = student.itc_logits(text.cls, image.cls)                 # (B captions, B images)
            out = {"scores": itc.gather(1, cands), "scores_tr": itc.T.gather(1, cands)}
            if "gt" in knowledge:
                terms["gt"] = contrastive(itc, batch["image"])
        if knowledge - {"gt"}:
            with torch.no_grad():
                target = fusion_rank_outputs(teacher, batch, cands, teacher_layers, views, states=bool(
                    knowledge & set(STATE_TERMS)))
            if "soft" in knowledge:
                terms["soft"] = rank_soft_labels(out, target, recipe.temperature)
            if views:
                terms |= knowledge_terms(knowledge, pairs, s_views, target["views"], batch["attention_mask"], modules)
        return _weighted(terms, recipe.weights)

    return loss_fn


def contrastive(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch contrastive CE of ``logits (B_text, B_image)``; rows and columns whose examples show the same
    image (``images (B,)`` store keys) are all positives, with equal target mass."""
    same = (images[:, None] == images[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets.T)) / 2


def dual_pretrain_loss(recipe: DistillParams, layers: list[int], teacher: ViltTeacher | None,
                       masker: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None):
    """DiDE pre-training distillation on image–caption pairs (the dual student has the teacher's depth: student
    layer l learns from teacher layer l):

    - ``itc``: symmetric in-batch contrastive CE over ``itc_logits`` (learnable temperature), :func:`contrastive`;
    - ``gt``: ITM, CE of ``itm_score(fuse(text, image))`` on matched pairs and in-batch rolled negatives;
    - ``soft``: τ²·KL(teacher ITM ‖ student ITM) on the same pairs;
    - ``attn_cross``: cross-modal attention KL at the chosen layers on the matched pairs only;
    - ``mlm`` (when ``masker`` is given): CE of the text tower's MLM head on 15% masked tokens (ground-truth labels;
      ``masker(ids, mask) → (masked ids, labels)``, see :func:`mask_tokens`).
    """
    knowledge = set(recipe.knowledge)
    use_attn = "attn_cross" in knowledge and teacher is not None
    wanted = layers if use_attn else []

    def loss_fn(student: DualEncoder, batch: dict) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        heads = student.config.num_attention_heads
        with capture_qk(student.text.layer, wanted, heads) as text_qk:
            text = student.encode_text(ids, mask)
        with capture_qk(student.image.layer, wanted, heads) as image_qk:
            image = student.encode_image(batch["pixel_values"], 1)
        terms = {"itc": contrastive(student.itc_logits(text.cls, image.cls), batch["image"])}
        pixels, itm_labels, swapped = itm_pairs(batch)
        neg_cls = torch.where(swapped[:, None], image.cls.roll(1, dims=0), image.cls)
        itm_logits = student.itm_score(student.fuse(text.cls, neg_cls))
        terms["gt"] = nn.functional.cross_entropy(itm_logits, itm_labels)
        if masker is not None:
            masked, labels = masker(ids, mask)
            mlm_logits = student.mlm_score(student.encode_text(masked, mask).sequence)
            terms["mlm"] = nn.functional.cross_entropy(mlm_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
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
        return _weighted(terms, recipe.weights)

    return loss_fn


# ------------------------------------------------------------------------------- what the distillation stages train
def trainable(student: nn.Module) -> nn.Module:
    """``student`` with only what its task's loss reads left trainable: every trainable parameter then gets a gradient
    at every step, which DDP requires. A dual encoder freezes the heads its task never uses
    (:meth:`DualEncoder.freeze_unused_heads`); a fusion student carries its task's head only, and uses it."""
    if isinstance(student, DualEncoder):
        student.freeze_unused_heads()
    return student


def distill_finetune_objective(recipe: DistillParams, task: str, student: nn.Module, teacher: ViltTeacher,
                               negatives: int, targets_for: Callable[[list[int]], Callable[[dict], dict] | None]
                               ) -> Objective:
    """What ``distill_finetune@<task>`` trains: the :func:`trainable` student, :func:`dide_loss` (classification)
    or :func:`retrieval_distill_loss`, and the loss's :class:`KnowledgeModules` for the recipe's layer pairs.

    ``targets_for(teacher_layers)`` gives the classification losses their ``teacher_fn`` (a cache or the live
    teacher; ``None`` for ground truth only); retrieval runs ``teacher`` on each batch's candidates itself."""
    pairs = distill_pairs(recipe, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    extras = KnowledgeModules(set(recipe.knowledge), pairs, student.config.hidden_size, teacher.config.hidden_size,
                              recipe.nce.queue_size, recipe.nce.temperature)
    if task == "retrieval":
        loss = retrieval_distill_loss(recipe, pairs, teacher, negatives, extras)
    else:
        loss = dide_loss(recipe, pairs, targets_for(sorted({t for _, t in pairs})), extras)
    return Objective(trainable(student), loss, extras)


def distill_pretrain_objective(recipe: DistillParams, student: DualEncoder, teacher: ViltTeacher,
                               masker: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                               ) -> Objective:
    """What ``distill_pretrain`` trains: the :func:`trainable` dual student (teacher's depth) and
    :func:`dual_pretrain_loss` at the recipe's layers."""
    depth = teacher.config.num_hidden_layers
    layers = [s for s, _ in distill_pairs(recipe, depth, depth)]
    return Objective(trainable(student), dual_pretrain_loss(recipe, layers, teacher, masker))


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
    logits, maps, passes = [], {(side, layer): ([], []) for side in (0, 1) for layer in layers}, 1
    for batch in split.loader(batch_size, shuffle=False, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = teacher_targets(teacher, batch, layers, attention, states=False)
        passes = len(out["views"])
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
        views = [{} for _ in range(passes)]
        for (side, layer), (t2i, i2t) in table_maps.items():
            views[side][layer] = LayerView(t2i=t2i[idx].to(dev).float(), i2t=i2t[idx].to(dev).float())
        return {"logits": table_logits[idx].to(dev), "views": views}

    return teacher_fn
