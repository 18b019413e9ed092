"""``export@<task>``: export every trained dual student of a task (:func:`vldistill.deploy.export.export_student`)
into ``models/export/<task>/<variant>``, its card filled from the pipeline's own files."""

from __future__ import annotations

from pathlib import Path

from vldistill import paths
from vldistill.config import Params
from vldistill.data import tokenizer as tok
from vldistill.data.datasets import load_split
from vldistill.data.prepared import read_answers, read_split
from vldistill.deploy.export import export_student, label_names, parity_batch
from vldistill.io import read_json

EXPORTS = Path("models/export")


def dual_variants(params: Params, task: str) -> list[str]:
    """The variants of ``deploy.export.variants`` that ``runs`` trains on ``task`` as dual encoders."""
    return [v for v in params.task_variants(task)
            if params.student_kind(v) == "dual" and v in params.deploy.export.variants]


def card_params(params: Params, task: str, variant: str) -> dict:
    """The params that made the student: its seed, recipe, student and teacher architecture, fine-tuning budget."""
    return {"seed": params.lead_seed, "distill": params.variant(variant).model_dump(),
            "student": params.student.model_dump(), "teacher": params.teacher.model_dump(),
            "train.distill_finetune": params.budget("distill_finetune", task).model_dump(),
            "data": {task: getattr(params.data, task).model_dump()}}


def export_task(params: Params, task: str) -> dict[str, dict]:
    """``{variant: vldistill.json}`` of the exports written for ``task``."""
    variants = dual_variants(params, task)
    if not variants:
        raise ValueError(f"deploy.export.variants={params.deploy.export.variants}: none is trained on {task!r} as a "
                         "dual-encoder student by runs; nothing to export")
    tokenizer = tok.load(paths.TOKENIZER)
    teacher = params.teacher
    split = load_split(paths.PREPARED, task, "test", tokenizer, teacher.max_text_len, teacher.pixel_norm)
    batch = parity_batch(split, params.deploy.export.parity_examples)
    answers = read_answers(paths.PREPARED, task) if task == "vqa" else None
    labels = label_names(read_split(paths.PREPARED, task, "train"), task, answers)
    base_model = teacher.init if teacher.init != "scratch" else None
    written, seed = {}, params.lead_seed  # the replica of the first seed (the others differ only by their seed)
    for variant in variants:
        written[variant] = export_student(
            paths.replica_dir(task, variant, seed), EXPORTS / task / variant, tokenizer, batch,
            task=task, variant=variant, pixel_norm=teacher.pixel_norm, max_text_len=teacher.max_text_len,
            labels=labels, metrics=read_json(paths.eval_metrics(task, paths.replica_name(variant, seed))),
            data_summary=read_json(paths.data_metrics(task)), params=card_params(params, task, variant),
            source=getattr(params.data, task).source, base_model=base_model, knobs=params.deploy.export)
    return written
