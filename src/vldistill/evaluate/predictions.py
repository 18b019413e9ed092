"""Per-example test predictions of a model, for error analysis and, on VQA, the official submission format.

- nlvr2 / snli_ve: ``[{"example": row, "label": predicted class id}]``;
- vqa: ``[{"question_id": id, "answer": text}]`` — the VQAv2 evaluation server's format, so at paper scale (test =
  test-dev questions, no answers) this file is the submission;
- retrieval: ``[{"caption": row, "images": [store keys of the top-5 images]}]``.
"""

from __future__ import annotations

from vldistill.evaluate.metrics import RetrievalScores, class_outputs, gallery, retrieval_scores

TOP_K_IMAGES = 5


def predictions(model, split, task: str, question_ids: list | None = None,
                answers: list[str] | None = None, fabric=None) -> list[dict]:
    """The task's prediction records (see the module docstring) for every example of ``split``; VQA needs the
    split's ``question_ids`` and the answer vocabulary ``answers``."""
    outputs = retrieval_scores(model, split, fabric=fabric) if task == "retrieval" else \
        class_outputs(model, split, task, fabric=fabric)
    return records(outputs, split, task, question_ids, answers)


def records(outputs: dict | RetrievalScores, split, task: str, question_ids: list | None = None,
            answers: list[str] | None = None) -> list[dict]:
    """:func:`predictions` from a model's outputs on ``split`` (:func:`~vldistill.evaluate.metrics.class_outputs`
    or, for retrieval, :class:`~vldistill.evaluate.metrics.RetrievalScores`: the top images of each caption by its
    ``ir`` scores)."""
    if task == "retrieval":
        rows, keys, _ = gallery(split)  # the columns of the scores: images in order of first appearance
        top = outputs.ir.topk(min(TOP_K_IMAGES, outputs.ir.shape[1]), dim=1).indices.tolist()
        return [{"caption": row, "images": [int(keys[i]) for i in best]} for row, best in zip(rows, top)]
    best = outputs["prediction"].tolist()
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
