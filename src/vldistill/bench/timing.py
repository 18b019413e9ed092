"""Timing one callable: warm-up, repeats until the median is stable, CUDA events on a GPU.

A measurement: ``warmup`` untimed calls, then timed calls until at least ``min_repeats`` were made and the running
median moved by less than ``rel_tol`` over the last call, or ``max_repeats`` calls were made, or (when set) the timed
calls add up to ``max_seconds``. On CUDA, CUDA events time each call (the GPU's own clock, synchronised after the
call); on CPU, ``time.perf_counter``. Callers wrap the calls in ``torch.inference_mode``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Protocol

import torch

Timer = Callable[[Callable[[], object]], list[float]]
"""``timer(fn) -> seconds of each timed call of fn``: what the benchmarks measure with (tests pass a fake one)."""


class TimingKnobs(Protocol):
    """What :func:`time_calls` reads: ``bench`` or ``bench.paper`` (:mod:`vldistill.config`)."""

    warmup: int
    min_repeats: int
    max_repeats: int
    rel_tol: float
    max_seconds: float | None


def time_calls(fn: Callable[[], object], knobs: TimingKnobs, device: str = "cpu", warmup: int | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of ``fn`` (at least ``min(knobs.min_repeats, knobs.max_repeats)`` timings).

    ``warmup`` overrides ``knobs.warmup`` (the paper scale warms each model up once, not before every batch size);
    ``clock`` is the CPU clock (injectable for tests)."""
    for _ in range(knobs.warmup if warmup is None else warmup):
        fn()
    times: list[float] = []
    previous = None
    while len(times) < knobs.max_repeats:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = clock()
            fn()
            times.append(clock() - t0)
        median = statistics.median(times)
        if len(times) >= knobs.min_repeats:
            if previous is not None and abs(median - previous) <= knobs.rel_tol * previous:
                break
            if knobs.max_seconds is not None and sum(times) >= knobs.max_seconds:
                break
        previous = median
    return times


def make_timer(knobs: TimingKnobs, device: str = "cpu", warmup: int | None = None) -> Timer:
    """:func:`time_calls` with these knobs, as a :data:`Timer`."""
    return lambda fn: time_calls(fn, knobs, device, warmup)


def summarise(times: list[float], batch: int) -> dict[str, float]:
    """Median and mean milliseconds per EXAMPLE (call time / batch), and the number of timed calls."""
    return {"median": 1000 * statistics.median(times) / batch, "mean": 1000 * statistics.fmean(times) / batch,
            "repeats": len(times)}


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` (matrix products, convolutions, attention: what
    ``torch.utils.flop_counter`` counts; a multiply–add is 2). The call runs for real (untimed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
