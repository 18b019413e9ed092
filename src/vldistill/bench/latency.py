"""Per-example latency of the fusion teacher vs the dual encoder, with and without cached image representations.

Each measurement: ``warmup`` untimed calls, then timed calls under ``torch.inference_mode`` until at least
``min_repeats`` were made and the running median moved by less than ``rel_tol`` over the last call (or
``max_repeats`` is reached). On CUDA, CUDA events time the calls. All ratios come from one run on one device.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from vldistill.config import BenchParams


def time_calls(fn: Callable[[], object], bench: BenchParams, device: str = "cpu") -> list[float]:
    """Seconds per call of ``fn`` (a list of at least ``bench.min_repeats`` timings)."""
    for _ in range(bench.warmup):
        fn()
    times: list[float] = []
    previous = None
    while len(times) < bench.max_repeats:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        if len(times) >= bench.min_repeats and previous is not None and abs(median - previous) <= bench.rel_tol * previous:
            break
        previous = median
    return times


def summarise(times: list[float], batch: int) -> dict[str, float]:
    """Median and mean milliseconds per EXAMPLE (call time / batch)."""
    return {"median": 1000 * statistics.median(times) / batch, "mean": 1000 * statistics.fmean(times) / batch,
            "repeats": len(times)}


def task_latency(teacher, student, batch: dict, bench: BenchParams, device: str = "cpu") -> dict[str, float]:
    """Time one batch of a classification task three ways (NLVR2: a pair of images per example; SNLI-VE, VQA: one):

    - ``teacher``: one joint ViLT pass per image + classifier;
    - ``dual``: text tower once, image tower per image, fusion MLP + classifier;
    - ``dual_cached``: text tower + fusion only, image [CLS] vectors precomputed (as a server with an image index).
    """
    size = batch["input_ids"].shape[0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        if "pixel_values_left" in batch:
            left, right = batch["pixel_values_left"], batch["pixel_values_right"]
            cached_left = student.encode_image(left, 1).cls
            cached_right = student.encode_image(right, 2).cls
            runs = {
                "teacher": lambda: teacher.nlvr2_logits(ids, mask, left, right),
                "dual": lambda: student.nlvr2_logits(ids, mask, left, right),
                "dual_cached": lambda: student.nlvr2_from_cls(student.encode_text(ids, mask).cls, cached_left,
                                                              cached_right),
            }
        else:
            pixels = batch["pixel_values"]
            cached = student.encode_image(pixels).cls
            runs = {
                "teacher": lambda: teacher.classify(ids, mask, pixels),
                "dual": lambda: student.classify(ids, mask, pixels),
                "dual_cached": lambda: student.classify_from_cls(student.encode_text(ids, mask).cls, cached),
            }
        stats = {name: summarise(time_calls(fn, bench, device), size) for name, fn in runs.items()}
    out = {f"{name}_ms": round(s["median"], 4) for name, s in stats.items()}
    out |= {f"{name}_ms_mean": round(s["mean"], 4) for name, s in stats.items()}
    out["speedup_uncached"] = round(stats["teacher"]["median"] / stats["dual"]["median"], 3)
    out["speedup_cached"] = round(stats["teacher"]["median"] / stats["dual_cached"]["median"], 3)
    return out
