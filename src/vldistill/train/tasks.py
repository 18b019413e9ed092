"""What differs between the downstream tasks: images per example, the teacher's head, the ground-truth and soft-label
losses, and the metric a checkpoint is chosen by on dev.

=========  ==============  ===========================  ===================================  ==========
task       images/example  teacher head (outputs)       ground truth                         dev metric
=========  ==============  ===========================  ===================================  ==========
nlvr2      2 (left, right) ``classifier`` (2)           CE on True/False                     accuracy
snli_ve    1               ``classifier`` (3)           CE on entailment/neutral/contradict  accuracy
vqa        1               ``classifier`` (#answers)    BCE × #answers on soft scores        vqa_score
retrieval  1               ``rank_output`` (1)          CE over [pair, K hard negatives],    r_mean
                                                        per caption and per image
=========  ==============  ===========================  ===================================  ==========
"""

from __future__ import annotations

from pathlib import Path

import torch

from vldistill.data.prepared import read_answers
from vldistill.distill import losses
from vldistill.evaluate.metrics import same_text

METRIC = {"nlvr2": "accuracy", "snli_ve": "accuracy", "vqa": "vqa_score", "retrieval": "r_mean"}
"""The dev metric each task's checkpoints are chosen by (retrieval: mean of IR/TR R@1, 5, 10)."""


def num_outputs(task: str, prepared: str | Path) -> int:
    """Width of the task head: classes, VQA answers (from the prepared answer vocabulary), or 1 rank score."""
    if task == "vqa":
        return len(read_answers(prepared, "vqa"))
    return {"nlvr2": 2, "snli_ve": 3, "retrieval": 1}[task]


def image_passes(batch: dict) -> list[tuple[str, int]]:
    """``[(pixel key, image token type)]`` of one example: NLVR2's two images (types 1, 2), else one image (type 1)."""
    if "pixel_values_left" in batch:
        return [("pixel_values_left", 1), ("pixel_values_right", 2)]
    return [("pixel_values", 1)]


def ground_truth(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """``gt``: VQA BCE against soft scores ``batch["targets"] (B, A)`` when present, else CE against ``labels``."""
    if "targets" in batch:
        return losses.vqa_ground_truth(logits, batch["targets"])
    return losses.ground_truth(logits, batch["labels"])


def soft_labels(student: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """``soft``: VQA's per-answer BCE against the teacher's sigmoid, else τ²·KL of the softmaxes."""
    if "targets" in batch:
        return losses.vqa_soft_labels(student, teacher)
    return losses.soft_labels(student, teacher, temperature)


def hard_negatives(input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor, k: int) -> torch.Tensor:
    """For each caption, the ``k`` in-batch rows (other than its own image's) whose captions share the most words with
    it, never a copy of its own text written for another image while there are enough other rows.

    Bags of words ``(B, V)`` of the real tokens; overlap ``(B, B)`` = their dot products; ties broken at random. The
    pairs a caption is most easily confused with are the ones ITM learns most from (as ViLT's IRTR draws its false
    pairs for). Excluded: same-image rows (its positives), and rows whose caption has exactly its tokens — the
    generated captions repeat generic texts across images, and such a row's image is described by this caption as
    truly as its own (a "negative" with the target of a positive). Those copies are picked, after every other row,
    only in a batch with fewer than ``k`` other texts. input_ids, attention_mask ``(B, T)``, images ``(B,)`` →
    ``(B, k)``.
    """
    if k >= len(images):
        raise ValueError(f"train.retrieval_negatives={k}: must be smaller than the batch size {len(images)}")
    vocab = int(input_ids.max()) + 1
    bags = torch.zeros(len(images), vocab, device=input_ids.device)
    bags.scatter_add_(1, input_ids, attention_mask.float())
    overlap = bags @ bags.T + torch.rand(len(images), len(images), device=input_ids.device)
    texts = same_text(input_ids, attention_mask)
    overlap = overlap.masked_fill(texts[:, None] == texts[None, :], -1e9)  # below every other row (small counts)
    overlap = overlap.masked_fill(images[:, None] == images[None, :], float("-inf"))
    return overlap.topk(k, dim=1).indices


def candidates(batch: dict, k: int) -> torch.Tensor:
    """``(B, 1 + k)`` in-batch row indices per row: itself first, then its ``k`` hard negatives — the rows whose
    images are scored against its caption (image retrieval) and whose captions are scored against its image (text
    retrieval: captions that share the most words with the image's own caption)."""
    own = torch.arange(len(batch["image"]), device=batch["image"].device)[:, None]
    return torch.cat([own, hard_negatives(batch["input_ids"], batch["attention_mask"], batch["image"], k)], dim=1)
