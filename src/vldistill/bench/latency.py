"""Per-example latency of the fusion teacher vs the dual encoder, with and without cached image representations.

One row per (task, batch size): median and mean milliseconds per example of three ways to answer a batch, the two
speed-ups of the dual encoder, and optionally the floating-point operations per example of each way. All ratios
come from one process on one device. How each call is timed is :mod:`vldistill.bench.timing`.
"""

from __future__ import annotations

from typing import Callable

import torch

from vldistill.bench.timing import Timer, count_flops, summarise

WAYS = ("teacher", "dual", "dual_cached")
"""The three ways timed; row keys are ``<way>_ms``, ``<way>_ms_mean``, ``<way>_repeats`` (and ``<way>_gflop``)."""


def cached_images(student, batch: dict, precompute: bool = True) -> list[torch.Tensor]:
    """The image [CLS] vectors a server with an image index would hold: ``[(B, D)]`` per image of an example
    (NLVR2: left, right). ``precompute=False`` gives random vectors of the same shape instead: the cached path's
    cost does not depend on their values, and at paper size on CPU the image-tower pass it saves takes seconds."""
    pair = "pixel_values_left" in batch
    keys = [("pixel_values_left", 1), ("pixel_values_right", 2)] if pair else [("pixel_values", 1)]
    size, dim = batch["input_ids"].shape[0], student.config.hidden_size
    with torch.inference_mode():
        if precompute:
            return [student.encode_image(batch[key], kind).cls for key, kind in keys]
        device = batch["input_ids"].device
        return [torch.randn(size, dim, device=device) for _ in keys]


def latency_calls(teacher, student, batch: dict, cached: list[torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """The three ways to answer ``batch`` (NLVR2: a pair of images per example; SNLI-VE, VQA: one), each returning
    the task logits ``(B, C)``:

    - ``teacher``: one joint ViLT pass per image + classifier;
    - ``dual``: text tower once, image tower per image, fusion MLP + classifier;
    - ``dual_cached``: text tower + fusion MLP + classifier, image [CLS] vectors ``cached``
      (from :func:`cached_images`).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if "pixel_values_left" in batch:
        left, right = batch["pixel_values_left"], batch["pixel_values_right"]
        return {
            "teacher": lambda: teacher.nlvr2_logits(ids, mask, left, right),
            "dual": lambda: student.nlvr2_logits(ids, mask, left, right),
            "dual_cached": lambda: student.nlvr2_from_cls(student.encode_text(ids, mask).cls, *cached),
        }
    pixels = batch["pixel_values"]
    return {
        "teacher": lambda: teacher.classify(ids, mask, pixels),
        "dual": lambda: student.classify(ids, mask, pixels),
        "dual_cached": lambda: student.classify_from_cls(student.encode_text(ids, mask).cls, cached[0]),
    }


def latency_row(times: dict[str, list[float]], batch: int, flops: dict[str, int] | None = None) -> dict[str, float]:
    """One row of ``latency.json`` from the timed calls (seconds per call) of each way at batch size ``batch``:
    ``<way>_ms`` (median ms per example), ``<way>_ms_mean``, ``<way>_repeats``, ``speedup_uncached`` =
    teacher / dual and ``speedup_cached`` = teacher / dual_cached (ratios of the medians); with ``flops`` (per
    example) also ``<way>_gflop``."""
    stats = {way: summarise(times[way], batch) for way in WAYS}
    row: dict[str, float] = {}
    for way, s in stats.items():
        row[f"{way}_ms"] = float(f"{s['median']:.8g}")  # 8 significant digits: tiny models take microseconds
        row[f"{way}_ms_mean"] = float(f"{s['mean']:.8g}")
        row[f"{way}_repeats"] = s["repeats"]
    row["speedup_uncached"] = round(stats["teacher"]["median"] / stats["dual"]["median"], 3)
    row["speedup_cached"] = round(stats["teacher"]["median"] / stats["dual_cached"]["median"], 3)
    for way, value in (flops or {}).items():
        row[f"{way}_gflop"] = float(f"{value / 1e9:.5g}")
    return row


def task_flops(teacher, student, batch: dict, precompute: bool = True) -> dict[str, int]:
    """Floating-point operations PER EXAMPLE of each way on ``batch`` (one untimed call each)."""
    calls = latency_calls(teacher, student, batch, cached_images(student, batch, precompute))
    size = batch["input_ids"].shape[0]
    with torch.inference_mode():
        return {way: count_flops(fn) // size for way, fn in calls.items()}


def task_latency(teacher, student, batch: dict, timer: Timer, precompute: bool = True,
                 flops: dict[str, int] | None = None) -> dict[str, float]:
    """Time the three ways of :func:`latency_calls` on one batch with ``timer`` → :func:`latency_row`."""
    calls = latency_calls(teacher, student, batch, cached_images(student, batch, precompute))
    with torch.inference_mode():
        times = {way: timer(fn) for way, fn in calls.items()}
    return latency_row(times, batch["input_ids"].shape[0], flops)
