"""Metrics over prepared splits, computed on ``fabric``'s device and precision and sharded over its processes (see
:mod:`vldistill.evaluate.sharding`; ``fabric=None``: the CPU, one process, float32)."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from vldistill.evaluate import sharding


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``argmax(logits (N, C))`` equal to ``labels (N,)``."""
    return float((logits.argmax(dim=-1) == labels).float().mean())


EVAL_BATCH = 256
"""Examples (classification), captions or images (dual-encoder retrieval) per forward pass."""


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model.eval()`` for the body, then the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def class_logits_fn(model, task: str) -> Callable[[dict], torch.Tensor]:
    """``batch → logits (B, C)`` of a teacher, dual or fusion student (all expose ``nlvr2_logits`` / ``classify``)."""
    if task == "nlvr2":
        return lambda b: model.nlvr2_logits(b["input_ids"], b["attention_mask"], b["pixel_values_left"],
                                            b["pixel_values_right"])
    return lambda b: model.classify(b["input_ids"], b["attention_mask"], b["pixel_values"])


def split_batches(split, batch_size: int, fabric=None) -> tuple[Iterator[dict], int]:
    """This process's block of the split's batches (of :meth:`~vldistill.data.datasets.EncodedSplit.loader`, in
    order, ``batch_size`` examples each, the last one shorter), on the device; and how many of them count (see
    :func:`~vldistill.evaluate.sharding.share`)."""
    loader = split.loader(batch_size, shuffle=False, seed=0, device=sharding.device(fabric))  # uint8 crosses
    mine, kept = sharding.share(len(loader.batch_sampler), fabric)
    loader.batch_sampler.set_epoch(0, mine.start)  # skip the batches of the ranks before this one
    return (sharding.to_device(b, fabric) for b in itertools.islice(loader, len(mine))), kept


@torch.no_grad()
def class_outputs(model, split, task: str, batch_size: int = EVAL_BATCH, fabric=None) -> dict[str, torch.Tensor]:
    """The model's answer to every example of ``split``, in order, on every process (CPU tensors):
    ``prediction (N,)`` (argmax of the float32 logits) and ``labels (N,)`` (nlvr2, snli_ve) or ``score (N, 1)``, the
    soft score of the predicted answer from the batch's targets (vqa)."""
    fn = class_logits_fn(model, task)
    parts: dict[str, list[torch.Tensor]] = {}
    batches, kept = split_batches(split, batch_size, fabric)
    with eval_mode(model):
        for batch in batches:
            with sharding.autocast(fabric):
                logits = fn(batch)
            prediction = logits.float().argmax(dim=-1)
            parts.setdefault("prediction", []).append(prediction)
            if task == "vqa":
                parts.setdefault("score", []).append(batch_targets(batch).gather(1, prediction[:, None]))
            elif "labels" in batch:  # a split without labels still gets predictions
                parts.setdefault("labels", []).append(batch["labels"])
    return {k: sharding.collect(v, kept, fabric) for k, v in parts.items()}


def batch_targets(batch: dict) -> torch.Tensor:
    """VQA: the batch's soft-score targets ``(B, A)``."""
    return batch["targets"]


def class_metrics(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{"accuracy"}`` (nlvr2, snli_ve) or ``{"vqa_score"}`` (vqa) from :func:`class_outputs`."""
    if "score" in outputs:
        return {"vqa_score": float(outputs["score"].mean())}
    return {"accuracy": float((outputs["prediction"] == outputs["labels"]).float().mean())}


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """VQA score: the soft score ``targets (N, A)`` of each question's argmax answer of ``logits (N, A)``, averaged."""
    return float(targets.gather(1, logits.argmax(dim=-1, keepdim=True)).mean())


def classification_metrics(model, split, task: str, batch_size: int = EVAL_BATCH, fabric=None) -> dict[str, float]:
    """``{"accuracy"}`` (nlvr2, snli_ve) or ``{"vqa_score"}`` (vqa) of a teacher, dual or fusion student in eval
    mode, sharded over the processes of ``fabric``."""
    return class_metrics(class_outputs(model, split, task, batch_size, fabric))


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


@dataclass
class RetrievalScores:
    """A model's scores of a split's captions (rows) against its images (columns), the arguments of
    :func:`recall_at_k`. ``ir`` ranks the images of each caption, ``tr`` the captions of each image: the same matrix
    for a full ranking; a re-ranking (:func:`rerank_candidates`) fills each with the fusion scores of its own
    direction's candidates and ``-inf`` elsewhere. ``pairs_scored``: joint (caption, image) passes of a fusion model
    (0 for a dual encoder's similarity matrix)."""

    ir: torch.Tensor           # (N_text, N_image)
    tr: torch.Tensor           # (N_text, N_image)
    text_image: torch.Tensor   # (N_text,) the image each caption was written for
    text_groups: torch.Tensor  # (N_text,) see same_text
    pairs_scored: int = 0

    def recall(self, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
        return recall_at_k(self.ir, self.text_image, self.text_groups, ks, tr_scores=self.tr)


@torch.no_grad()
def retrieval_scores(model, split, captions_per_image: int | None = None, batch_size: int = EVAL_BATCH,
                     fabric=None, candidates: torch.Tensor | None = None) -> RetrievalScores:
    """Scores of every caption against every image of the split (see :class:`RetrievalScores`).

    Dual encoder (has ``itc_logits``): each caption and image encoded once (chunks of ``batch_size``, sharded over
    the processes, embeddings gathered), the full similarity matrix. Fusion encoder (teacher or fusion student):
    ``rank_score`` of every (caption, image) pair, one joint pass each, or only of the pairs of ``candidates``
    (``(N_text, N_image, 2)`` bool: IR, TR candidates, from :func:`rerank_candidates`).
    """
    rows, keys, text_image = gallery(split, captions_per_image)
    ids = split.columns["input_ids"][rows].to(sharding.device(fabric))
    mask = split.columns["attention_mask"][rows].to(sharding.device(fabric))
    groups = same_text(ids.cpu(), mask.cpu())
    with eval_mode(model):
        if hasattr(model, "itc_logits"):
            scores = _similarity(model, split, ids, mask, keys, batch_size, fabric)
            return RetrievalScores(scores, scores, text_image, groups)
        if candidates is None:
            pairs = torch.cartesian_prod(torch.arange(len(rows)), torch.arange(len(keys)))  # row-major
        else:
            pairs = (candidates[..., 0] | candidates[..., 1]).nonzero()  # each candidate pair once, row-major
        per_pass = max(1, batch_size // len(keys)) * len(keys)  # pairs per forward pass: captions x every image
        gallery_images = split.images[keys].to(sharding.device(fabric))  # uint8 (N_image, H, W, 3), on the device
        flat = _pair_scores(model, ids, mask, gallery_images, split.pixel_norm, pairs, per_pass, fabric)
    full = torch.full((len(rows), len(keys)), float("-inf"))
    full[pairs[:, 0], pairs[:, 1]] = flat
    if candidates is None:
        return RetrievalScores(full, full, text_image, groups, len(pairs))
    ir, tr = (full.masked_fill(~candidates[..., d], float("-inf")) for d in (0, 1))
    return RetrievalScores(ir, tr, text_image, groups, len(pairs))


def _similarity(model, split, ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor, batch_size: int,
                fabric) -> torch.Tensor:
    """A dual encoder's ``itc_logits`` of captions ``ids``/``mask (N_text, T)`` against the store images ``keys
    (N_image,)``: ``(N_text, N_image)`` float32 on the CPU, each tower in chunks of ``batch_size``."""
    from vldistill.data.datasets import to_pixels

    def image_cls(s: slice) -> torch.Tensor:
        pixels = to_pixels(split.images[keys[s]].to(sharding.device(fabric)), split.pixel_norm)  # on the device
        return model.encode_image(sharding.pixels_in(pixels, fabric)).cls

    texts = _encoded(lambda s: model.encode_text(ids[s], mask[s]).cls, len(ids), batch_size, fabric)
    images = _encoded(image_cls, len(keys), batch_size, fabric)
    with sharding.autocast(fabric):
        return model.itc_logits(texts, images).float().cpu()


def _encoded(encode: Callable[[slice], torch.Tensor], n: int, batch_size: int, fabric) -> torch.Tensor:
    """``encode(slice)`` over ``range(n)`` in chunks of ``batch_size``, this process's block of chunks, gathered:
    ``(n, D)`` on the device of every process."""
    mine, kept = sharding.share(-(-n // batch_size), fabric)
    parts = []
    for chunk in mine:
        with sharding.autocast(fabric):
            parts.append(encode(slice(chunk * batch_size, min((chunk + 1) * batch_size, n))))
    return sharding.collect(parts, kept, fabric).to(sharding.device(fabric))


def _pair_scores(model, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor, norm: str, pairs: torch.Tensor,
                 per_pass: int, fabric) -> torch.Tensor:
    """``rank_score`` of caption ``pairs[p, 0]`` (rows of ``ids``, ``mask`` ``(N_text, T)``) with image
    ``pairs[p, 1]`` (of the uint8 gallery ``images (N_image, H, W, 3)``) for every pair ``p``: ``(P,)`` float32 on
    the CPU. Passes of ``per_pass`` consecutive pairs, this process's block of them, gathered."""
    from vldistill.data.datasets import to_pixels

    mine, kept = sharding.share(-(-len(pairs) // per_pass), fabric)
    parts = []
    for j in mine:
        text, image = pairs[j * per_pass:(j + 1) * per_pass].to(images.device).unbind(1)
        pixels = sharding.pixels_in(to_pixels(images[image], norm).contiguous(), fabric)
        with sharding.autocast(fabric):
            parts.append(model.rank_score(ids[text], mask[text], pixels).float().reshape(-1))
    return sharding.collect(parts, kept, fabric)


def rerank_candidates(dual: RetrievalScores, k: int) -> torch.Tensor:
    """The pairs a fusion model re-scores (ALBEF/BLIP-style re-ranking): ``(N_text, N_image, 2)`` bool, ``[..., 0]``
    the top-``k`` images of each caption (IR), ``[..., 1]`` the top-``k`` captions of each image (TR), by the dual
    encoder's similarity ``dual``. At most ``N_text·k + N_image·k`` distinct pairs; with ``k`` ≥ the number of
    images and of captions, every pair (the full ranking)."""
    scores = dual.ir
    candidates = torch.zeros((*scores.shape, 2), dtype=torch.bool)
    n_text, n_image = scores.shape
    ir = scores.topk(min(k, n_image), dim=1).indices
    candidates[torch.arange(n_text)[:, None], ir, 0] = True
    tr = dual.tr.topk(min(k, n_text), dim=0).indices
    candidates[tr, torch.arange(n_image)[None, :], 1] = True
    return candidates


def same_text(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` group id per caption: captions with the same tokens (``input_ids``, ``attention_mask`` ``(N, T)``)
    share one. A model necessarily scores them alike, so :func:`recall_at_k` treats them as one text."""
    tokens = input_ids.masked_fill(attention_mask == 0, -1)
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def recall_at_k(scores: torch.Tensor, text_image: torch.Tensor, text_groups: torch.Tensor | None = None,
                ks: tuple[int, ...] = (1, 5, 10), tr_scores: torch.Tensor | None = None) -> dict[str, float]:
    """Image retrieval (IR: caption → an image it describes) and text retrieval (TR: image → a caption that describes
    it) recall@K from ``scores (N_text, N_image)``; ``r_mean`` is the mean of all of them.

    A caption describes its own image ``text_image (N_text,)`` and, when ``text_groups (N_text,)`` is given, every
    image that has a caption with the same text (generated data repeats generic captions — "there is one object" —
    across images, and identical texts score identically, so counting the copies of its own caption that belong to
    other images as wrong would put a perfect model's TR near chance). The rank of a query is the number of candidates
    it is *not* described by (IR: images; TR: captions) that score at least as high as its best described one: ties
    with a wrong candidate count against the model. Without ``text_groups`` this is the usual per-caption protocol.
    ``tr_scores (N_text, N_image)``, when given, ranks TR instead of ``scores`` (a re-ranking scores each direction's
    own candidates, see :class:`RetrievalScores`).
    """
    n_text, n_image = scores.shape
    groups = torch.arange(n_text) if text_groups is None else text_groups.cpu()
    group_images = torch.zeros(int(groups.max()) + 1, n_image, dtype=torch.bool)
    group_images[groups, text_image.cpu()] = True
    describes = group_images[groups]                                           # (N_text, N_image)
    right = scores.masked_fill(~describes, float("-inf"))
    wrong = scores.masked_fill(describes, float("-inf"))
    ir_rank = (wrong >= right.max(dim=1, keepdim=True).values).sum(dim=1)      # (N_text,)
    if tr_scores is not None:
        right = tr_scores.masked_fill(~describes, float("-inf"))
        wrong = tr_scores.masked_fill(describes, float("-inf"))
    tr_rank = (wrong >= right.max(dim=0, keepdim=True).values).sum(dim=0)      # (N_image,)
    result = {}
    for k in ks:
        result[f"ir_r{k}"] = float((ir_rank < k).float().mean())
    for k in ks:
        result[f"tr_r{k}"] = float((tr_rank < k).float().mean())
    result["r_mean"] = sum(result.values()) / len(result)
    return result


def task_metrics(model, split, task: str, fabric=None, captions_per_image: int | None = None) -> dict[str, float]:
    """The metrics of ``task`` on ``split`` (see :data:`vldistill.train.tasks.METRIC`), on ``fabric``'s device and
    precision, sharded over its processes, the same on every process."""
    if task == "retrieval":
        return retrieval_scores(model, split, captions_per_image, fabric=fabric).recall()
    return classification_metrics(model, split, task, fabric=fabric)
