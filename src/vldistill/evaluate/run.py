"""``evaluate@<task>``: score the fine-tuned teacher and every student variant on dev and test."""

from __future__ import annotations

import torch

from vldistill import paths
from vldistill.config import Params
from vldistill.data import tokenizer as tok
from vldistill.data.datasets import load_split
from vldistill.evaluate.metrics import task_metrics
from vldistill.io import write_json
from vldistill.models.fusion import load_student
from vldistill.models.teacher import ViltTeacher

SPLITS = ("dev", "test")


def models_for(task: str, params: Params) -> dict[str, object]:
    """``{"teacher": path, "<variant>": path, ..., "<ablation variant>_seed<k>": path}``: the checkpoints evaluated
    for ``task`` (every run of ``runs`` on it, and the ablation runs when it is ``ablation.task``)."""
    found = {"teacher": paths.model_dir("teacher_finetune", task)}
    for variant in params.task_variants(task) + params.ablation_models(task):
        found[variant] = paths.model_dir("distill_finetune", task, variant)
    return found


def evaluate_task(params: Params, task: str) -> dict[str, dict]:
    """Write ``metrics/eval/<task>/<model>.json = {"dev": {<metric>: value}, "test": {...}}`` for every model
    (metrics of :func:`task_metrics`: accuracy, vqa_score, or retrieval recalls over every caption and image)."""
    torch.manual_seed(params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    splits = {s: load_split(paths.PREPARED, task, s, tokenizer, params.teacher.max_text_len, params.teacher.pixel_norm)
              for s in SPLITS}
    results = {}
    for name, path in models_for(task, params).items():
        model = ViltTeacher.load(path) if name == "teacher" else load_student(path)
        model.eval()
        results[name] = {split: {k: round(v, 6) for k, v in task_metrics(model, data, task).items()}
                         for split, data in splits.items()}
        write_json(paths.eval_metrics(task, name), results[name])
    return results
