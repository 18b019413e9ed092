"""``benchmark``: latency of the trained embedded teacher and DiDE student per task and batch size."""

from __future__ import annotations

import torch

from vldistill import paths
from vldistill.bench.latency import task_latency
from vldistill.config import Params
from vldistill.data import tokenizer as tok
from vldistill.data.datasets import load_split
from vldistill.io import write_json
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher


LATENCY_TASKS = ("nlvr2", "snli_ve", "vqa")
"""Tasks timed per example (retrieval's cost is a function of the gallery size, not of one example)."""


def run_benchmark(params: Params) -> dict:
    """``{"embedded": {task: {batch: {...}}}}`` written to ``metrics/bench/latency.json``."""
    bench = params.bench
    if bench.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.device='cuda' but no CUDA device is visible; use bench.device=cpu")
    torch.set_num_threads(bench.threads)
    tokenizer = tok.load(paths.TOKENIZER)
    results: dict = {"embedded": {}}
    for task in [t for t in params.tasks if t in LATENCY_TASKS]:
        teacher = ViltTeacher.load(paths.model_dir("teacher_finetune", task)).eval().to(bench.device)
        student = DualEncoder.load(paths.model_dir("distill_finetune", task, "dide")).eval().to(bench.device)
        split = load_split(paths.PREPARED, task, "test", tokenizer, params.teacher.max_text_len, params.teacher.pixel_norm)
        results["embedded"][task] = {}
        for size in bench.batch_sizes:
            batch = {k: v.to(bench.device) for k, v in split.collate(list(range(min(size, len(split))))).items()}
            results["embedded"][task][str(size)] = task_latency(teacher, student, batch, bench, bench.device)
    results["device"] = {"kind": bench.device, "threads": bench.threads, "torch": torch.__version__}
    write_json(paths.LATENCY, results)
    return results
