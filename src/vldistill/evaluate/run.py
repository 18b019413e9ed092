"""``evaluate@<task>``: score the fine-tuned teacher and every student variant on dev and test."""

from __future__ import annotations

import torch

from vldistill import paths
from vldistill.config import Params
from vldistill.data import tokenizer as tok
from vldistill.data.datasets import load_split
from vldistill.data.prepared import read_answers, read_split
from vldistill.evaluate import sharding
from vldistill.evaluate.metrics import class_metrics, class_outputs, rerank_candidates, retrieval_scores
from vldistill.evaluate.predictions import answered, records
from vldistill.io import write_json
from vldistill.models.fusion import load_student
from vldistill.models.teacher import ViltTeacher

SPLITS = ("dev", "test")
ATTENTION_EXAMPLES = 4
"""Test examples (the first ones) shown in each task's attention figure."""
ATTENTION_MODELS = ("teacher", "dide", "dual_gt")
"""Models whose maps the figure compares (those trained on the task, students by their first seed's replica);
dual_gt shows what no attention KD gives."""


def models_for(task: str, params: Params) -> dict[str, object]:
    """``{"teacher": path, "<variant>_seed<k>": path, ...}``: the checkpoints evaluated for ``task``, the fine-tuned
    teacher and every seed's replica of every run of ``runs`` on it."""
    found = {"teacher": paths.model_dir("teacher_finetune", task)}
    for variant in params.task_variants(task):
        for seed in params.seeds:
            found[paths.replica_name(variant, seed)] = paths.replica_dir(task, variant, seed)
    return found


def lead_replica(params: Params, variant: str) -> str:
    """The model name of the replica that stands for ``variant`` (:attr:`Params.lead_seed`'s)."""
    return paths.replica_name(variant, params.lead_seed)


def ranking(name: str, is_dual: bool, params: Params) -> str:
    """How ``name``'s retrieval recalls were ranked: ``full`` (a dual encoder's similarity matrix, or a fusion
    model scoring every pair) or ``rerank@<k> by <dual variant>`` (``evaluate.rerank_k``)."""
    knobs = params.evaluate
    if is_dual or knobs.rerank_k is None:
        return "full"
    return f"rerank@{knobs.rerank_k} by {lead_replica(params, knobs.rerank_with)}"


def evaluate_task(params: Params, task: str, fabric=None) -> dict[str, dict]:
    """Write ``metrics/eval/<task>/<model>.json = {"dev": {<metric>: value}, "test": {...}}`` for every model
    (metrics of :func:`~vldistill.evaluate.metrics.task_metrics`: accuracy, vqa_score, or retrieval recalls over every
    caption and image) and its test predictions ``predictions/<task>/<model>.json`` (:mod:`vldistill.evaluate.predictions`; on VQA the
    submission format). A VQA test split without answers (VQAv2 test-dev at paper scale) gets no test metrics: the
    evaluation server scores the submission file. Retrieval also writes ``metrics/eval/retrieval/ranking.meta.json``
    (:func:`vldistill.paths.eval_ranking`): how each model's recalls were ranked, and the joint passes it took.

    Each model runs once per split on ``fabric``'s device and precision, sharded over its processes (``None``: the
    CPU, one process); only rank 0 writes."""
    torch.manual_seed(params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    splits = {s: load_split(paths.PREPARED, task, s, tokenizer, params.teacher.max_text_len, params.teacher.pixel_norm)
              for s in SPLITS}
    scored = [s for s in SPLITS if task != "vqa" or answered(splits[s])]
    vqa = {}
    if task == "vqa":
        vqa = {"question_ids": read_split(paths.PREPARED, task, "test")["question_id"].tolist(),
               "answers": read_answers(paths.PREPARED, task)}
    found = models_for(task, params)
    candidates = {}
    if task == "retrieval" and params.evaluate.rerank_k is not None:
        dual = sharding.place(load_student(found[lead_replica(params, params.evaluate.rerank_with)]), fabric)
        candidates = {s: rerank_candidates(retrieval_scores(dual, splits[s], fabric=fabric), params.evaluate.rerank_k)
                      for s in SPLITS}
        del dual
    results, ranked = {}, {}
    rank_zero = fabric is None or fabric.is_global_zero
    for name, path in found.items():
        model = sharding.place(ViltTeacher.load(path) if name == "teacher" else load_student(path), fabric).eval()
        outputs, metrics = {}, {}
        for split in SPLITS:
            if task == "retrieval":
                is_dual = hasattr(model, "itc_logits")
                outputs[split] = retrieval_scores(model, splits[split], fabric=fabric,
                                                  candidates=None if is_dual else candidates.get(split))
                metrics[split] = outputs[split].recall()
            elif split in scored or split == "test":
                outputs[split] = class_outputs(model, splits[split], task, fabric=fabric)
                metrics[split] = class_metrics(outputs[split])
        results[name] = {split: {k: round(v, 6) for k, v in metrics[split].items()} for split in scored}
        if task == "retrieval":
            ranked[name] = {"ranking": ranking(name, is_dual, params),
                            "pairs_scored": {s: outputs[s].pairs_scored for s in SPLITS},
                            "pairs_total": {s: outputs[s].ir.numel() for s in SPLITS}}
        if rank_zero:
            write_json(paths.eval_metrics(task, name), results[name])
            write_json(paths.predictions(task, name), records(outputs["test"], splits["test"], task, **vqa))
        del model
    if ranked and rank_zero:
        write_json(paths.eval_ranking(task), ranked)
    return results


def attention_figure(params: Params, task: str, out) -> object:
    """``reports/attention/<task>.png``: the teacher's and the students' last-layer text→image attention on the first
    :data:`ATTENTION_EXAMPLES` test examples (see :mod:`vldistill.evaluate.attention`)."""
    from vldistill.evaluate.attention import plot_maps, text_to_image_maps

    tokenizer = tok.load(paths.TOKENIZER)
    split = load_split(paths.PREPARED, task, "test", tokenizer, params.teacher.max_text_len, params.teacher.pixel_norm)
    batch = split.collate(list(range(min(ATTENTION_EXAMPLES, len(split)))))
    available = models_for(task, params)
    maps = {}
    for name in ATTENTION_MODELS:
        key = name if name == "teacher" else lead_replica(params, name)
        if key in available:
            model = (ViltTeacher.load(available[key]) if name == "teacher" else load_student(available[key])).eval()
            maps[name] = text_to_image_maps(model, batch)
    image_key = "image_left" if "image_left" in split.columns else "image"
    images = split.images[split.columns[image_key][batch["index"]]]
    texts = [split.texts[i] for i in batch["index"].tolist()]
    return plot_maps(images, texts, maps, out, f"{task}: last-layer text→image attention (test examples"
                     f"{', left image' if image_key == 'image_left' else ''})")
