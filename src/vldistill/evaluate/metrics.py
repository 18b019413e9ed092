"""Metrics over prepared splits."""

from __future__ import annotations

from typing import Callable

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``argmax(logits (N, C))`` equal to ``labels (N,)``."""
    return float((logits.argmax(dim=-1) == labels).float().mean())


@torch.no_grad()
def predict(logits_fn: Callable[[dict], torch.Tensor], split, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``logits_fn(batch)`` over a whole split in order. Returns ``(logits (N, C), labels (N,))`` on the CPU."""
    outs, labels = [], []
    for batch in split.loader(batch_size, shuffle=False, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        outs.append(logits_fn(batch).float().cpu())
        labels.append(batch["labels"].cpu())
    return torch.cat(outs), torch.cat(labels)


def nlvr2_accuracy(model, split, batch_size: int = 256, device="cpu") -> float:
    """NLVR2 accuracy of a teacher or a dual encoder (both expose ``nlvr2_logits``), in eval mode."""
    was_training = model.training
    model.eval()
    logits, labels = predict(lambda b: model.nlvr2_logits(b["input_ids"], b["attention_mask"], b["pixel_values_left"],
                                                          b["pixel_values_right"]), split, batch_size, device)
    model.train(was_training)
    return accuracy(logits, labels)


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """VQA score: the soft score ``targets (N, A)`` of each question's argmax answer of ``logits (N, A)``, averaged."""
    return float(targets.gather(1, logits.argmax(dim=-1, keepdim=True)).mean())


def classification_metrics(model, split, task: str, batch_size: int = 256, device="cpu") -> dict[str, float]:
    """``{"accuracy"}`` (nlvr2, snli_ve) or ``{"vqa_score"}`` (vqa) of a teacher, dual or fusion student in eval
    mode (all expose ``nlvr2_logits`` / ``classify``)."""
    was_training = model.training
    model.eval()
    if task == "nlvr2":
        fn = lambda b: model.nlvr2_logits(b["input_ids"], b["attention_mask"], b["pixel_values_left"],  # noqa: E731
                                          b["pixel_values_right"])
    else:
        fn = lambda b: model.classify(b["input_ids"], b["attention_mask"], b["pixel_values"])  # noqa: E731
    if task == "vqa":
        with torch.no_grad():
            logits = torch.cat([fn({k: v.to(device) for k, v in b.items()}).float().cpu()
                                for b in split.loader(batch_size, shuffle=False, seed=0)])
        result = {"vqa_score": vqa_score(logits, split.columns["targets"])}
    else:
        logits, labels = predict(fn, split, batch_size, device)
        result = {"accuracy": accuracy(logits, labels)}
    model.train(was_training)
    return result


def gallery(split, captions_per_image: int | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The retrieval layout of a split: ``(caption rows, image store keys (I,), caption → image position (N,))``,
    images in order of first appearance; ``captions_per_image`` keeps only the first captions of each image."""
    keys, position, rows, seen = [], {}, [], {}
    for row, key in enumerate(split.columns["image"].tolist()):
        if captions_per_image is not None and seen.get(key, 0) >= captions_per_image:
            continue
        seen[key] = seen.get(key, 0) + 1
        if key not in position:
            position[key] = len(keys)
            keys.append(key)
        rows.append(row)
    text_image = torch.tensor([position[k] for k in split.columns["image"][rows].tolist()])
    return rows, torch.tensor(keys), text_image


@torch.no_grad()
def retrieval_scores(model, split, captions_per_image: int | None = None, batch_size: int = 256,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of every caption against every image of the split: ``(scores (N_text, N_image), text_image (N_text,),
    text_groups (N_text,))``, the last from :func:`same_text` (the arguments of :func:`recall_at_k`, in order).

    Dual encoder (has ``itc_logits``): each caption and image encoded once, the full similarity matrix. Fusion encoder
    (teacher or fusion student): ``rank_score`` of every (caption, image) pair, one joint pass each.
    """
    from vldistill.data.datasets import to_pixels

    was_training = model.training
    model.eval()
    rows, keys, text_image = gallery(split, captions_per_image)
    ids = split.columns["input_ids"][rows].to(device)
    mask = split.columns["attention_mask"][rows].to(device)
    pixels = lambda k: to_pixels(split.images[k], split.pixel_norm).to(device)  # noqa: E731
    if hasattr(model, "itc_logits"):
        texts = torch.cat([model.encode_text(ids[i:i + batch_size], mask[i:i + batch_size]).cls
                           for i in range(0, len(rows), batch_size)])
        images = torch.cat([model.encode_image(pixels(keys[i:i + batch_size])).cls
                            for i in range(0, len(keys), batch_size)])
        scores = model.itc_logits(texts, images).float().cpu()
    else:
        per_chunk = max(1, batch_size // len(keys))  # captions per forward pass, each against all images
        image_pixels = pixels(keys)
        chunks = []
        for i in range(0, len(rows), per_chunk):
            n = min(per_chunk, len(rows) - i)
            out = model.rank_score(ids[i:i + n].repeat_interleave(len(keys), 0),
                                   mask[i:i + n].repeat_interleave(len(keys), 0), image_pixels.repeat(n, 1, 1, 1))
            chunks.append(out.view(n, len(keys)).float().cpu())
        scores = torch.cat(chunks)
    model.train(was_training)
    return scores, text_image, same_text(ids.cpu(), mask.cpu())


def same_text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` group id per caption: captions with the same tokens (``input_ids``, ``attention_mask`` ``(N, T)``)
    share one. A model necessarily scores them alike, so :func:`recall_at_k` treats them as one text."""
    tokens = input_ids.masked_fill(attention_mask == 0, -1)
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def recall_at_k(scores: torch.Tensor, text_image: torch.Tensor, text_groups: torch.Tensor | None = None,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image retrieval (IR: caption → an image it describes) and text retrieval (TR: image → a caption that describes
    it) recall@K from ``scores (N_text, N_image)``; ``r_mean`` is the mean of all of them.

    A caption describes its own image ``text_image (N_text,)`` and, when ``text_groups (N_text,)`` is given, every
    image that has a caption with the same text (generated data repeats generic captions — "there is one object" —
    across images, and identical texts score identically, so counting the copies of its own caption that belong to
    other images as wrong would put a perfect model's TR near chance). The rank of a query is the number of candidates
    it is *not* described by (IR: images; TR: captions) that score at least as high as its best described one: ties
    with a wrong candidate count against the model. Without ``text_groups`` this is the usual per-caption protocol.
    """
    n_text, n_image = scores.shape
    groups = torch.arange(n_text) if text_groups is None else text_groups.cpu()
    group_images = torch.zeros(int(groups.max()) + 1, n_image, dtype=torch.bool)
    group_images[groups, text_image.cpu()] = True
    describes = group_images[groups]                                           # (N_text, N_image)
    right = scores.masked_fill(~describes, float("-inf"))
    wrong = scores.masked_fill(describes, float("-inf"))
    ir_rank = (wrong >= right.max(dim=1, keepdim=True).values).sum(dim=1)      # (N_text,)
    tr_rank = (wrong >= right.max(dim=0, keepdim=True).values).sum(dim=0)      # (N_image,)
    result = {}
    for k in ks:
        result[f"ir_r{k}"] = float((ir_rank < k).float().mean())
    for k in ks:
        result[f"tr_r{k}"] = float((tr_rank < k).float().mean())
    result["r_mean"] = sum(result.values()) / len(result)
    return result


def task_metrics(model, split, task: str, device="cpu", captions_per_image: int | None = None) -> dict[str, float]:
    """The metrics of ``task`` on ``split`` (see :data:`vldistill.train.tasks.METRIC`)."""
    if task == "retrieval":
        return recall_at_k(*retrieval_scores(model, split, captions_per_image, device=device))
    return classification_metrics(model, split, task, device=device)
