"""Where evaluation runs and which share of the work each process takes.

Every evaluation function takes ``fabric`` (a launched :class:`lightning_fabric.Fabric`, or ``None``: the CPU, one
process, float32 — exactly what evaluation did before it could run elsewhere). With a Fabric, models and inputs go
to ``fabric.device``, forward passes run under ``fabric.autocast()`` (its precision) and outputs are cast to float32
before any metric is computed.

With W > 1 processes a split's work is cut into units (batches of examples, chunks of captions or images, passes of
(caption, image) pairs), each process computes one contiguous block of units (:func:`share`), and the results are
gathered in unit order on every process (:func:`gather`). Each unit is computed exactly as one process computes it,
so the gathered outputs — and every metric from them — are those of one process (bit for bit on CPU) and the same
on every rank: the dev metric that picks the best epoch agrees everywhere.
"""

from __future__ import annotations

import contextlib
import copy
from typing import ContextManager

import torch

from vldistill.train.loop import gather_rows


def device(fabric) -> torch.device:
    """``fabric.device``, or the CPU."""
    return torch.device("cpu") if fabric is None else fabric.device


def autocast(fabric) -> ContextManager:
    """The precision's forward context (``torch.autocast`` under ``*-mixed``), or nothing."""
    return contextlib.nullcontext() if fabric is None else fabric.autocast()


def world(fabric) -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a Fabric."""
    return (0, 1) if fabric is None else (fabric.global_rank, fabric.world_size)


def to_device(batch: dict[str, torch.Tensor], fabric) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on the device; the model's float inputs (``pixel_values*``) in the dtype a
    ``*-true`` precision gives the weights (unchanged under ``32-true`` and ``*-mixed``)."""
    moved = {k: v.to(device(fabric)) for k, v in batch.items()}
    if fabric is not None:
        moved |= {k: fabric.strategy.precision.convert_input(v) for k, v in moved.items() if k.startswith("pixel")}
    return moved


def pixels_in(pixels: torch.Tensor, fabric) -> torch.Tensor:
    """``pixels`` (already on the device) in the model's input dtype (see :func:`to_device`)."""
    return pixels if fabric is None else fabric.strategy.precision.convert_input(pixels)


def place(model: torch.nn.Module, fabric, keep: bool = False) -> torch.nn.Module:
    """``model`` on the device in the precision's weight dtype (``*-true`` converts the weights). ``keep``: a
    copy is placed, so that ``model`` itself stays where and as it is (a model saved afterwards)."""
    if fabric is None:
        return model
    if keep:
        model = copy.deepcopy(model)
    return fabric.strategy.precision.convert_module(fabric.to_device(model))


def share(units: int, fabric) -> tuple[range, int]:
    """What this process computes of ``range(units)``: its contiguous block (rank r of W: ``[r·units//W,
    (r+1)·units//W)``) and how many of the block's units it keeps. A process whose block is empty (fewer units than
    processes) computes unit 0 and keeps none of it: it still has a tensor of the right shape and dtype for
    :func:`gather`."""
    rank, size = world(fabric)
    mine = range(units * rank // size, units * (rank + 1) // size)
    if len(mine) or units == 0:
        return mine, len(mine)
    return range(0, 1), 0


def gather(rows: torch.Tensor, fabric) -> torch.Tensor:
    """``rows (N_r, ...)`` of every process → ``(Σ N_r, ...)`` on the CPU of every process, rank 0's first (the
    order of the units, since :func:`share` gives each rank the next block)."""
    if world(fabric)[1] == 1:
        return rows.cpu()
    return gather_rows(fabric, rows.to(device(fabric))).cpu()


def collect(parts: list[torch.Tensor], kept: int, fabric) -> torch.Tensor:
    """The outputs of this process's units (``parts``, in order; only the first ``kept`` units count, see
    :func:`share`) concatenated, then gathered from every process (:func:`gather`)."""
    rows = torch.cat(parts)
    return gather(rows if kept else rows[:0], fabric)
