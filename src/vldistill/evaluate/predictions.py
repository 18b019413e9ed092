"""Per-example test predictions of a model, for error analysis and, on VQA, the official submission format.

- nlvr2 / snli_ve: ``[{"example": row, "label": predicted class id}]``;
- vqa: ``[{"question_id": id, "answer": text}]`` — the VQAv2 evaluation server's format, so at paper scale (test =
  test-dev questions, no answers) this file is the submission;
- retrieval: ``[{"caption": row, "images": [store keys of the top-5 images]}]``.
"""

from __future__ import annotations

import torch

from vldistill.evaluate.metrics import gallery, retrieval_scores

TOP_K_IMAGES = 5


@torch.no_grad()
def class_logits(model, split, task: str, batch_size: int = 256) -> torch.Tensor:
    """``(N, C)`` logits of a teacher, dual or fusion student over a split, in order, in eval mode."""
    model.eval()
    outs = []
    for batch in split.loader(batch_size, shuffle=False, seed=0):
        if task == "nlvr2":
            logits = model.nlvr2_logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values_left"],
                                        batch["pixel_values_right"])
        else:
            logits = model.classify(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        outs.append(logits.float())
    return torch.cat(outs)


def predictions(model, split, task: str, question_ids: list | None = None,
                answers: list[str] | None = None) -> list[dict]:
    """The task's prediction records (see the module docstring) for every example of ``split``; VQA needs the
    split's ``question_ids`` and the answer vocabulary ``answers``."""
    if task == "retrieval":
        scores = retrieval_scores(model, split)[0]
        rows, keys, _ = gallery(split)  # the columns of ``scores``: images in order of first appearance
        top = scores.topk(min(TOP_K_IMAGES, scores.shape[1]), dim=1).indices.tolist()
        return [{"caption": row, "images": [int(keys[i]) for i in best]} for row, best in zip(rows, top)]
    best = class_logits(model, split, task).argmax(dim=-1).tolist()
    if task == "vqa":
        if question_ids is None or answers is None:
            raise ValueError("vqa predictions need the split's question_ids and the answer vocabulary")
        return [{"question_id": _plain(q), "answer": answers[a]} for q, a in zip(question_ids, best)]
    return [{"example": row, "label": label} for row, label in enumerate(best)]


def answered(split) -> bool:
    """Whether a VQA split has ground-truth answers (the paper-scale test split, VQAv2 test-dev, has none: its score
    comes from the evaluation server, given the submission file)."""
    return bool(split.columns["targets"].any())


def _plain(value):
    """numpy scalars → Python (json)."""
    return value.item() if hasattr(value, "item") else value
