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
from vldistill.distill.attention import capture_qk, cross_modal_attention, split_joint
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher


class Objective(nn.Module):
    """``forward(batch)`` = ``loss_fn(self.model, batch)``; ``self.model`` is what gets trained and saved."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], dict[str, torch.Tensor]]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

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
def distill_layers(recipe: DistillParams, num_layers: int) -> list[int]:
    """``last`` → the last layer; ``layerwise`` → every layer (teacher and student have the same depth)."""
    return [num_layers - 1] if recipe.layers == "last" else list(range(num_layers))


@torch.no_grad()
def teacher_nlvr2_targets(teacher: ViltTeacher, batch: dict, layers: list[int], attention: bool) -> dict:
    """The frozen teacher's NLVR2 knowledge for a batch: ``logits (B,2)`` and, when ``attention``, for each layer and
    each image pass, ``(t2i (B,H,T,I), i2t (B,H,I,T))`` recomputed from its Q/K split at the text length."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads, text_len = teacher.config.num_attention_heads, ids.shape[1]
    pooled, attn = [], {layer: [] for layer in layers}
    for side, type_idx in (("pixel_values_left", 1), ("pixel_values_right", 2)):
        with capture_qk(teacher.vilt.encoder.layer, layers if attention else [], heads) as qk:
            _, p = teacher.encode(ids, mask, batch[side], image_token_type_idx=type_idx)
        pooled.append(p)
        if attention:
            image_mask = torch.ones(ids.shape[0], qk[layers[0]]["q"].shape[2] - text_len, dtype=torch.bool,
                                    device=ids.device)
            for layer in layers:
                q_t, k_t, q_i, k_i = split_joint(qk[layer], text_len)
                attn[layer].append(cross_modal_attention(q_t, k_t, q_i, k_i, mask.bool(), image_mask))
    logits = teacher.classifier(torch.cat(pooled, dim=-1))
    return {"logits": logits, "attn": attn if attention else {}}


def student_nlvr2_outputs(student: DualEncoder, batch: dict, layers: list[int], attention: bool) -> dict:
    """The dual encoder's NLVR2 logits ``(B,2)`` and, when ``attention``, its cross-modal distributions per layer and
    image: text-tower Q/K against image-tower Q/K (what DiDE aligns with the teacher's cross-modal attention)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    heads = student.config.num_attention_heads
    wanted = layers if attention else []
    with capture_qk(student.text.layer, wanted, heads) as text_qk:
        text = student.encode_text(ids, mask)
    images, attn = [], {layer: [] for layer in layers}
    for side, type_idx in (("pixel_values_left", 1), ("pixel_values_right", 2)):
        with capture_qk(student.image.layer, wanted, heads) as image_qk:
            images.append(student.encode_image(batch[side], type_idx))
        if attention:
            for layer in layers:
                q_i, k_i = image_qk[layer]["q"], image_qk[layer]["k"]
                image_mask = torch.ones(q_i.shape[0], q_i.shape[2], dtype=torch.bool, device=q_i.device)
                attn[layer].append(cross_modal_attention(text_qk[layer]["q"], text_qk[layer]["k"], q_i, k_i,
                                                         mask.bool(), image_mask))
    logits = student.nlvr2_from_cls(text.cls, images[0].cls, images[1].cls)
    return {"logits": logits, "attn": attn}


def dide_nlvr2_loss(recipe: DistillParams, layers: list[int], teacher_fn: Callable[[dict], dict]):
    """DiDE fine-tuning distillation on NLVR2: ``Σ_k w_k L_k`` over ``recipe.knowledge`` with

    - ``gt``: CE(student logits, labels);
    - ``soft``: τ²·KL(teacher ‖ student) of the pair logits;
    - ``attn_cross``: for each chosen layer and each image of the pair, KL of t2i + i2t (teacher ‖ student),
      averaged over the layers and the two images.

    ``teacher_fn(batch)`` returns the teacher's targets (cached per example or computed on the fly).
    """
    knowledge = set(recipe.knowledge)
    use_attn = "attn_cross" in knowledge
    weights = recipe.weights

    def loss_fn(student: DualEncoder, batch: dict) -> dict[str, torch.Tensor]:
        out = student_nlvr2_outputs(student, batch, layers, use_attn)
        terms: dict[str, torch.Tensor] = {}
        if "gt" in knowledge:
            terms["gt"] = losses.ground_truth(out["logits"], batch["labels"])
        target = teacher_fn(batch) if knowledge - {"gt"} else None
        if "soft" in knowledge:
            terms["soft"] = losses.soft_labels(out["logits"], target["logits"], recipe.temperature)
        if use_attn:
            mask = batch["attention_mask"].bool()
            per = []
            for layer in layers:
                for s_pair, t_pair in zip(out["attn"][layer], target["attn"][layer]):
                    image_mask = torch.ones(s_pair[0].shape[0], s_pair[0].shape[-1], dtype=torch.bool, device=mask.device)
                    per.append(losses.cross_modal_attention_loss(s_pair, t_pair, mask, image_mask))
            terms["attn_cross"] = torch.stack(per).mean()
        terms["loss"] = sum(getattr(weights, k) * v for k, v in terms.items())
        return terms

    return loss_fn


def dual_pretrain_loss(recipe: DistillParams, layers: list[int], teacher: ViltTeacher | None):
    """Minimal DiDE pre-training distillation on image–caption pairs:

    - ITC: symmetric in-batch contrastive CE over ``itc_logits`` (learnable temperature);
    - ITM: CE of ``itm_score(fuse(text, image))`` on matched pairs and in-batch rolled negatives (``gt``);
    - ``soft``: τ²·KL(teacher ITM ‖ student ITM) on the same pairs;
    - ``attn_cross``: cross-modal attention KL at the chosen layers on the matched pairs only.
    """
    knowledge = set(recipe.knowledge)
    weights = recipe.weights

    def loss_fn(student: DualEncoder, batch: dict) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        heads = student.config.num_attention_heads
        use_attn = "attn_cross" in knowledge and teacher is not None
        with capture_qk(student.text.layer, layers if use_attn else [], heads) as text_qk:
            text = student.encode_text(ids, mask)
        with capture_qk(student.image.layer, layers if use_attn else [], heads) as image_qk:
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
            if use_attn:
                per = []
                with torch.no_grad(), capture_qk(teacher.vilt.encoder.layer, layers, heads) as t_qk:
                    teacher.encode(ids, mask, batch["pixel_values"])
                image_mask = torch.ones(ids.shape[0], image.sequence.shape[1], dtype=torch.bool, device=ids.device)
                for layer in layers:
                    t_pair = cross_modal_attention(*split_joint(t_qk[layer], ids.shape[1]), mask.bool(), image_mask)
                    s_pair = cross_modal_attention(text_qk[layer]["q"], text_qk[layer]["k"], image_qk[layer]["q"],
                                                   image_qk[layer]["k"], mask.bool(), image_mask)
                    per.append(losses.cross_modal_attention_loss(s_pair, t_pair, mask.bool(), image_mask))
                terms["attn_cross"] = torch.stack(per).mean()
        terms["loss"] = terms["itc"] + sum(getattr(weights, k) * v for k, v in terms.items() if k != "itc")
        return terms

    return loss_fn


@torch.no_grad()
def cache_teacher_targets(teacher: ViltTeacher, split, layers: list[int], attention: bool, batch_size: int,
                          device: torch.device) -> Callable[[dict], dict]:
    """Run the frozen teacher (eval mode) once over a split and return ``teacher_fn(batch)`` that looks its targets
    up by ``batch["index"]``. Exact for a deterministic teacher and unaugmented inputs; attention maps are stored in
    float16 (``(N, H, T, I)`` and ``(N, H, I, T)`` per layer and image) to halve the memory."""
    teacher.eval()
    logits, attn = [], {layer: [[], [], [], []] for layer in layers}
    for batch in split.loader(batch_size, shuffle=False, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = teacher_nlvr2_targets(teacher, batch, layers, attention)
        logits.append(out["logits"].float().cpu())
        for layer in out["attn"]:
            for j, tensor in enumerate([t for pair in out["attn"][layer] for t in pair]):
                attn[layer][j].append(tensor.to(torch.float16).cpu())
    table_logits = torch.cat(logits)
    table_attn = {layer: [torch.cat(parts) for parts in lists] for layer, lists in attn.items() if lists[0]}

    def teacher_fn(batch: dict) -> dict:
        idx = batch["index"].cpu()
        dev = batch["input_ids"].device
        out = {"logits": table_logits[idx].to(dev), "attn": {}}
        for layer, (t2i_l, i2t_l, t2i_r, i2t_r) in table_attn.items():
            out["attn"][layer] = [(t2i_l[idx].to(dev).float(), i2t_l[idx].to(dev).float()),
                                  (t2i_r[idx].to(dev).float(), i2t_r[idx].to(dev).float())]
        return out

    return teacher_fn
