"""``benchmark``: latency per example and retrieval cost against gallery size, at two scales.

- ``embedded``: the trained models of this pipeline (``models/teacher_finetune/<task>`` and the DiDE replica of the
  first seed of ``seeds``, ``models/distill_finetune/<task>/dide/seed<k>``) on the first examples of each task's test
  split; retrieval on synthetic galleries with the trained retrieval models (random weights at the embedded size when
  retrieval is not a task).
- ``paper``: ViLT-B/32 and its dual encoder with random weights on synthetic inputs (:mod:`vldistill.bench.paper`),
  when ``bench.paper.enabled``.

Writes ``metrics/bench/latency.json`` = ``{"embedded"|"paper": {task: {"<batch>": row}}, "device": {...},
"setup": {"<scale>": {...}, "units": {...}}}`` (rows: :func:`vldistill.bench.latency.latency_row`) and
``metrics/bench/retrieval.json`` = ``{"embedded"|"paper": {"<N>": row}, "device": {...}, "setup": {...}}``
(rows: :func:`vldistill.bench.retrieval.scaling_row`).
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Iterator

import torch
from lightning_fabric import Fabric

from vldistill import paths
from vldistill.bench import paper as paper_size
from vldistill.bench import retrieval
from vldistill.bench.latency import task_flops, task_latency
from vldistill.bench.timing import make_timer
from vldistill.config import BenchParams, Params
from vldistill.io import write_json
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher, vilt_config

LATENCY_TASKS = ("nlvr2", "snli_ve", "vqa")
"""Tasks timed per example (retrieval's cost is a function of the gallery size, not of one example)."""
RETRIEVAL = Path("metrics/bench/retrieval.json")

UNITS = {
    "<way>_ms": "median milliseconds per example over the timed calls (call time / batch size)",
    "<way>_ms_mean": "mean milliseconds per example",
    "<way>_repeats": "timed calls",
    "<way>_gflop": "floating-point operations per example, 1e9 (torch.utils.flop_counter; multiply-add = 2)",
    "speedup_uncached": "teacher_ms / dual_ms",
    "speedup_cached": "teacher_ms / dual_cached_ms",
    "ways": {"teacher": "one joint ViLT pass per image + classifier",
             "dual": "text tower + image tower per image + fusion MLP + classifier",
             "dual_cached": "text tower + fusion MLP + classifier (image [CLS] vectors precomputed)"},
}
RETRIEVAL_UNITS = {
    "images": "gallery size N", "captions": "5N", "pairs": "5N^2 (caption, image) pairs",
    "dual_s": "seconds to score every caption against every image with the dual encoder",
    "dual_measured": "end_to_end: timed on the whole gallery; extrapolated: N*per_image + 5N*per_caption + matrix",
    "teacher_s": "seconds for the fusion teacher: 5N^2 * teacher_per_pair_ms / 1000 (always extrapolated)",
    "speedup": "teacher_s / dual_s",
}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads, then restore the previous number."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_device(bench: BenchParams, precision: str = "32-true") -> None:
    if bench.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench.device='cuda' but no CUDA device is visible; use bench.device=cpu")
    if bench.device == "cpu" and precision == "16-mixed":
        raise RuntimeError("bench.precision=16-mixed (null: fabric.precision) needs bench.device=cuda; set "
                           "bench.precision=32-true or bf16-mixed on cpu")


def bench_fabric(bench: BenchParams, precision: str = "32-true") -> Fabric:
    """A one-device Fabric on ``bench.device`` with ``precision``: what the timings use of it is its device, its
    autocast (every timed call runs inside it) and its weight and input conversions (``*-true``)."""
    return Fabric(accelerator=bench.device, devices=1, precision=precision)


def _place(model: torch.nn.Module, fabric: Fabric) -> torch.nn.Module:
    """``model`` on the fabric's device, in its precision's weight dtype."""
    return fabric.strategy.precision.convert_module(fabric.to_device(model))


def device_info(bench: BenchParams, precision: str = "32-true") -> dict:
    """What the timings were taken on: ``kind`` (cpu|cuda), ``name``, ``threads`` (embedded), ``paper_threads``,
    ``precision`` (forward passes under its autocast)."""
    if bench.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return {"kind": bench.device, "name": name, "threads": bench.threads, "paper_threads": bench.paper.threads,
            "precision": precision, "torch": torch.__version__}


def _to(batch: dict, fabric: Fabric) -> dict:
    """The batch on the fabric's device, float inputs in its precision's input dtype."""
    return {k: fabric.strategy.precision.convert_input(v.to(fabric.device)) if v.is_floating_point() else
            v.to(fabric.device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------- latency
def embedded_latency(params: Params) -> dict[str, dict]:
    """``{task: {"<batch>": row}}`` for the trained teacher and DiDE student of each task, on the first ``batch``
    examples of its test split; warm-up before every measurement."""
    from vldistill.data import tokenizer as tok
    from vldistill.data.datasets import load_split

    bench = params.bench
    fabric = bench_fabric(bench, bench.precision_of(params.fabric))
    tasks = [t for t in params.tasks if t in LATENCY_TASKS]
    tokenizer = tok.load(paths.TOKENIZER) if tasks else None
    timer = make_timer(bench, bench.device)
    results: dict[str, dict] = {}
    for task in tasks:
        teacher = _place(ViltTeacher.load(paths.model_dir("teacher_finetune", task)).eval(), fabric)
        student = _place(DualEncoder.load(paths.replica_dir(task, "dide", params.lead_seed)).eval(), fabric)
        split = load_split(paths.PREPARED, task, "test", tokenizer, params.teacher.max_text_len,
                           params.teacher.pixel_norm)
        with fabric.autocast():
            flops = task_flops(teacher, student, _to(split.collate([0]), fabric))
            results[task] = {}
            for size in bench.batch_sizes:
                batch = _to(split.collate(list(range(min(size, len(split))))), fabric)
                results[task][str(size)] = task_latency(teacher, student, batch, timer, flops=flops)
    return results


def paper_latency(bench: BenchParams, tasks: tuple[str, ...] = LATENCY_TASKS,
                  precision: str = "32-true") -> dict[str, dict]:
    """``{task: {"<batch>": row}}`` at the paper's size (``bench.paper.architecture``, random weights, synthetic
    inputs). Batch sizes in increasing order; ``bench.paper.warmup`` untimed calls per model before its first
    (smallest) batch on CPU, where one call takes seconds, and before every batch on CUDA. The cached image vectors
    are random (:func:`vldistill.bench.latency.cached_images`). Forward passes under ``precision``'s autocast."""
    knobs, arch = bench.paper, bench.paper.architecture
    fabric = bench_fabric(bench, precision)
    sizes = sorted(knobs.batch_sizes or bench.batch_sizes)
    results: dict[str, dict] = {}
    for task in tasks:
        teacher, student = (_place(m, fabric) for m in paper_size.paper_models(task, arch))
        inputs = lambda size: _to(paper_size.synthetic_batch(task, size, arch.text_len, arch.vocab_size,  # noqa: E731
                                                              arch.image_size), fabric)
        with fabric.autocast():
            flops = task_flops(teacher, student, inputs(1), precompute=False)
            results[task] = {}
            for i, size in enumerate(sizes):
                warmup = knobs.warmup if i == 0 or bench.device == "cuda" else 0
                timer = make_timer(knobs, bench.device, warmup)
                results[task][str(size)] = task_latency(teacher, student, inputs(size), timer, precompute=False,
                                                        flops=flops)
        del teacher, student
    return results


# --------------------------------------------------------------------------------------------------- retrieval
def embedded_retrieval_models(params: Params) -> tuple[ViltTeacher, DualEncoder, str]:
    """The trained retrieval teacher and DiDE student when retrieval is a task, else both with random weights at
    the embedded size (``teacher.*``, ``tokenizer.vocab_size``, the scene image size); and which it was."""
    if "retrieval" in params.tasks:
        teacher = ViltTeacher.load(paths.model_dir("teacher_finetune", "retrieval"))
        student = DualEncoder.load(paths.replica_dir("retrieval", "dide", params.lead_seed))
        return teacher.eval(), student.eval(), "trained"
    image_size = params.data.scene.grid * params.data.scene.cell
    config = vilt_config(params.teacher, image_size, params.tokenizer.vocab_size)
    torch.manual_seed(params.seed)
    teacher = ViltTeacher(config, heads=("retrieval",)).eval()
    student = DualEncoder.from_teacher(teacher, params.student.fusion_hidden, task="retrieval", num_outputs=1)
    return teacher, student.eval(), "random"


def embedded_retrieval(params: Params, teacher=None, student=None) -> dict[str, dict]:
    """``{"<N>": row}``: dual encoder end to end on each gallery, teacher from ``bench.retrieval_pairs`` pairs per
    call (models from :func:`embedded_retrieval_models` unless given), under the precision timed."""
    bench = params.bench
    fabric = bench_fabric(bench, bench.precision_of(params.fabric))
    if teacher is None or student is None:
        teacher, student, _ = embedded_retrieval_models(params)
    teacher, student = _place(teacher, fabric), _place(student, fabric)
    sizes = retrieval.gallery_sizes(bench.retrieval_max)
    config = teacher.config
    n = max(max(sizes), -(-bench.retrieval_pairs // retrieval.CAPTIONS_PER_IMAGE))
    inputs = retrieval.Inputs.make(n, config.max_position_embeddings, config.vocab_size,
                                   (config.image_size, config.image_size))
    inputs = retrieval.Inputs(*_to({"images": inputs.images, "ids": inputs.ids, "mask": inputs.mask}, fabric).values())
    with fabric.autocast():
        return retrieval.scaling_end_to_end(teacher, student, sizes, inputs, bench.retrieval_batch,
                                            bench.retrieval_pairs, make_timer(bench, bench.device))


def paper_retrieval(bench: BenchParams, precision: str = "32-true") -> dict[str, dict]:
    """``{"<N>": row}`` at the paper's size: both models extrapolated from unit costs (the matrix timed per N),
    forward passes under ``precision``'s autocast."""
    knobs, arch = bench.paper, bench.paper.architecture
    fabric = bench_fabric(bench, precision)
    teacher, student = (_place(m, fabric) for m in paper_size.paper_models("retrieval", arch))
    n = max(knobs.retrieval_batch, -(-knobs.retrieval_pairs // retrieval.CAPTIONS_PER_IMAGE))
    inputs = retrieval.Inputs.make(n, arch.text_len, arch.vocab_size, arch.image_size)
    inputs = retrieval.Inputs(*_to({"images": inputs.images, "ids": inputs.ids, "mask": inputs.mask}, fabric).values())
    with fabric.autocast():
        return retrieval.scaling_extrapolated(teacher, student, retrieval.gallery_sizes(bench.retrieval_max), inputs,
                                              knobs.retrieval_batch, knobs.retrieval_pairs,
                                              make_timer(knobs, bench.device))


# --------------------------------------------------------------------------------------------------- the stage
TIMING = ("warmup", "min_repeats", "max_repeats", "rel_tol", "max_seconds", "threads")


def _timing(knobs) -> dict:
    return {k: getattr(knobs, k) for k in TIMING}


def latency_setup(bench: BenchParams, seed: int) -> dict:
    """How each latency scale was measured (recorded beside the numbers); ``seed``: the DiDE replica timed."""
    out = {"embedded": {"models": f"trained: models/teacher_finetune/<task>, "
                                  f"{paths.replica_dir('<task>', 'dide', seed).as_posix()} (the first seed of seeds)",
                        "inputs": "test split, first <batch> examples", "batch_sizes": bench.batch_sizes,
                        "warmup_per": "measurement", **_timing(bench)},
           "units": UNITS}
    if bench.paper.enabled:
        knobs = bench.paper
        out["paper"] = {"models": "teacher and dual encoder of this architecture (default ViLT-B/32), random weights",
                        "architecture": paper_size.describe(knobs.architecture), "inputs": "synthetic",
                        "batch_sizes": sorted(knobs.batch_sizes or bench.batch_sizes),
                        "warmup_per": "measurement" if bench.device == "cuda" else "model, before its smallest batch",
                        "cached_images": "random vectors (the cost does not depend on their values)",
                        **_timing(knobs)}
    return out


def retrieval_setup(bench: BenchParams, models: str) -> dict:
    """How each retrieval scale was measured (recorded beside the numbers)."""
    out = {"embedded": {"models": models, "inputs": "synthetic", "retrieval_pairs": bench.retrieval_pairs,
                        "retrieval_batch": bench.retrieval_batch, **_timing(bench)},
           "units": RETRIEVAL_UNITS}
    if bench.paper.enabled:
        knobs = bench.paper
        out["paper"] = {"models": "teacher (rank head) and dual encoder of this architecture (default ViLT-B/32), "
                                  "random weights",
                        "architecture": paper_size.describe(knobs.architecture), "inputs": "synthetic",
                        "retrieval_pairs": knobs.retrieval_pairs, "retrieval_batch": knobs.retrieval_batch,
                        **_timing(knobs)}
    return out


def run_latency(params: Params) -> dict:
    """Write and return ``metrics/bench/latency.json``."""
    bench = params.bench
    precision = bench.precision_of(params.fabric)
    check_device(bench, precision)
    with torch_threads(bench.threads):
        results: dict = {"embedded": embedded_latency(params)}
    if bench.paper.enabled:
        with torch_threads(bench.paper.threads):
            results["paper"] = paper_latency(bench, precision=precision)
    results |= {"device": device_info(bench, precision), "setup": latency_setup(bench, params.lead_seed)}
    write_json(paths.LATENCY, results)
    return results


def run_retrieval(params: Params) -> dict:
    """Write and return ``metrics/bench/retrieval.json``."""
    bench = params.bench
    precision = bench.precision_of(params.fabric)
    check_device(bench, precision)
    teacher, student, models = embedded_retrieval_models(params)
    with torch_threads(bench.threads):
        results: dict = {"embedded": embedded_retrieval(params, teacher, student)}
    if bench.paper.enabled:
        with torch_threads(bench.paper.threads):
            results["paper"] = paper_retrieval(bench, precision=precision)
    results |= {"device": device_info(bench, precision), "setup": retrieval_setup(bench, models)}
    write_json(RETRIEVAL, results)
    return results


def run_benchmark(params: Params) -> tuple[dict, dict]:
    """Both benchmark files: ``(latency, retrieval)``."""
    return run_latency(params), run_retrieval(params)
