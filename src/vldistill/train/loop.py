"""The one training loop every training stage shares (Lightning Fabric).

    for epoch:                                   # order of batches and random streams fixed by (seed, epoch)
        for batch: terms = model(batch)          # dict of loss terms, "loss" = weighted sum
                   backward (accumulated to effective_batch), clip, AdamW step, schedule step
                   every checkpoint_every steps: checkpoint(..., position in the epoch, RNG states)
        dev = evaluate_fn(model)                 # the model kept for test is the best on dev, never on test
        checkpoint(model, optimizer, scheduler, epoch, best, curve)

Resume by step: ``checkpoints/<stage>/.../last.ckpt`` (outside DVC's outputs, written atomically) holds the model,
optimizer, scheduler, epoch, step, the number of batches consumed in the current epoch, every process's RNG states
(torch CPU/CUDA, python, numpy) and loss sums not logged yet, the best-so-far state and the history. A rerun of an
interrupted stage replays the epoch's order (:class:`~vldistill.data.datasets.EpochBatches` is seeded
``seed + epoch``), skips the batches already consumed and restores the RNG states, so it ends with the weights,
metrics and curve of an uninterrupted run (bit for bit on CPU). A checkpoint carries a fingerprint of the stage's
inputs and is ignored when it differs.

Stopping early (:mod:`vldistill.train.faults`): SIGINT or SIGTERM during ``fit`` writes the checkpoint at the end of
the current optimizer step (after the epoch's evaluation if it was the epoch's last) and raises ``Interrupted``; a NaN
or infinite loss term or gradient norm raises ``NonFiniteLoss`` before the step is applied, with the last checkpoint
left as it was. Neither changes what an uninterrupted run computes.

Several processes (``fabric.devices`` > 1, ``strategy: ddp``): each optimizer step consumes one global batch of
``effective_batch`` examples of the same permutation one process would use, rank ``r`` taking its contiguous slice,
so W processes take the optimizer steps of one process with the same effective batch (up to float summation order).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import os
import random
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from lightning_fabric import Fabric
from tqdm import tqdm

from vldistill.config import FabricParams, StageBudget
from vldistill.data.datasets import EpochBatches, SplitLoader
from vldistill.io import atomic_path
from vldistill.train.faults import Interrupted, NonFiniteLoss, StopSignals, agreed_non_finite, non_finite_terms
from vldistill.train.optim import adamw, warmup_linear
from vldistill.train.tracking import Tracker

EvalFn = Callable[[torch.nn.Module], dict[str, float]]


def make_fabric(params: FabricParams, seed: int) -> Fabric:
    """Fabric from ``fabric.*``; launched (processes spawned under ddp when not already under torchrun/SLURM)."""
    fabric = Fabric(accelerator=params.accelerator, devices=params.devices, num_nodes=params.num_nodes,
                    strategy=params.strategy, precision=params.precision)
    if os.environ.get("LT_CLI_USED") != "1":  # under `fabric run` the CLI has launched the processes already
        fabric.launch()
    fabric.seed_everything(seed, workers=True, verbose=False)
    return fabric


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_dev: dict[str, float]
    history: list[dict] = field(default_factory=list)
    steps: int = 0


def write_curve(path: Path, history: list[dict]) -> None:
    """Write the training curve CSV (one row per logged step; dev metrics on epoch-end rows)."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)


def fit(
    fabric: Fabric,
    model: torch.nn.Module,
    train_loader: torch.utils.data.DataLoader,
    evaluate_fn: EvalFn,
    budget: StageBudget,
    monitor: str,
    ckpt_dir: str | Path,
    curve_path: str | Path,
    fingerprint: str,
    seed: int,
    tracker: Tracker | None = None,
    head_prefixes: tuple[str, ...] = (),
    seed_per_batch: bool = False,
) -> FitResult:
    """Train ``model`` for ``budget.epochs`` epochs; keep the state with the best ``evaluate_fn(model)[monitor]``.

    ``model(batch)`` returns the loss terms ``{"loss": total, <term>: value}`` (see
    :class:`vldistill.train.objectives.Objective`); every term is checked to be finite at every step (raises
    :class:`~vldistill.train.faults.NonFiniteLoss`), and a stop signal ends training with a checkpoint (raises
    :class:`~vldistill.train.faults.Interrupted`).
    ``train_loader`` is best an :meth:`EncodedSplit.loader <vldistill.data.datasets.EncodedSplit.loader>`: its
    :class:`~vldistill.data.datasets.EpochBatches` is sharded here, so W processes take the optimizer steps one
    process takes with the same effective batch. Any other DataLoader gets Fabric's distributed sampler.
    A checkpoint is written every ``budget.checkpoint_every`` optimizer steps (if set) and at every epoch end.
    ``seed_per_batch`` (``fabric.seed_per_batch``): torch's stream is reseeded before every batch from
    :func:`batch_seed` (the batch's place in the epoch's global order), so the losses' random draws (masking, ITM
    negatives, tie breaks, dropout) do not depend on the number of processes or on accumulation; otherwise it is
    seeded once per epoch and process, and consumed batch after batch.
    """
    ckpt_path = Path(ckpt_dir) / "last.ckpt"
    rank, world = fabric.global_rank, fabric.world_size
    if budget.effective_batch and budget.effective_batch % (budget.batch_size * world):
        raise ValueError(f"effective_batch={budget.effective_batch}: must be a multiple of batch_size x processes = "
                         f"{budget.batch_size} x {world}")
    accumulate = max(1, (budget.effective_batch or budget.batch_size) // (budget.batch_size * world))
    batches = train_loader.batch_sampler if isinstance(train_loader.batch_sampler, EpochBatches) else None
    if batches is not None:
        batches.shard(rank, world, accumulate)
    if isinstance(train_loader, SplitLoader):  # uint8 images cross to the device, become float pixels there
        train_loader.to(fabric.device)
    loader = fabric.setup_dataloaders(train_loader, use_distributed_sampler=world > 1 and batches is None)
    steps_per_epoch = max(1, len(loader) // accumulate)
    total_steps = steps_per_epoch * budget.epochs

    optimizer = adamw(model, budget, head_prefixes)
    scheduler = warmup_linear(optimizer, total_steps, budget.warmup_ratio)
    model, optimizer = fabric.setup(model, optimizer)
    step_end = _step_end_hooks(fabric, model)

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0, "step": 0, "batch": 0,
             "best": {"epoch": -1, "value": -math.inf, "dev": {}}, "history": [], "ranks": [],
             "fingerprint": fingerprint}
    with contextlib.ExitStack() as closing:  # on the way out, however it ends: the bar closes, then the handlers go
        stop = closing.enter_context(StopSignals(announce=fabric.is_global_zero))
        resumed, best_state = _resume(fabric, ckpt_path, state)
        saved_step = state["step"] if resumed else None  # the optimizer step of the checkpoint this run stands on
        bar = closing.enter_context(tqdm(total=total_steps, initial=state["step"], desc=str(curve_path),
                                         disable=not fabric.is_global_zero, dynamic_ncols=True,
                                         mininterval=1.0 if sys.stderr.isatty() else 30.0))
        # resumed at an epoch's start: python's and numpy's streams go on from where the run that wrote it left them
        # (torch's is reseeded below); a mid-epoch resume restores every stream after the reseed instead
        epoch_start_rng = (state["ranks"][rank]["rng"] if resumed and not state["batch"] and len(state["ranks"]) == world
                           else None)
        for epoch in range(state["epoch"], budget.epochs):
            skip = state["batch"]  # > 0 only in the epoch a step checkpoint was resumed from
            epoch_batches = _epoch_batches(loader, train_loader, batches, epoch, seed, skip)
            if epoch_start_rng is not None:
                _set_rng_state(epoch_start_rng)
                epoch_start_rng = None
            torch.manual_seed(seed + 1000 * epoch + rank)  # dropout/masking stream, replayable on resume
            window = _empty_window()  # loss terms summed since the last logged row, and the optimizer steps they span
            if skip:  # where this process of the interrupted run was after batch ``skip``
                _set_rng_state(state["ranks"][rank]["rng"])
                window = state["ranks"][rank]["window"]
            model.train()
            for i, batch in enumerate(epoch_batches, start=skip):
                if seed_per_batch:
                    torch.manual_seed(batch_seed(seed, epoch, global_batch(i, rank, world, accumulate)))
                is_step = (i + 1) % accumulate == 0
                with fabric.no_backward_sync(model, enabled=not is_step):
                    terms = model(batch)
                    values = {k: float(v.detach()) for k, v in terms.items()}  # the one host sync per term
                    bad = agreed_non_finite(fabric, non_finite_terms(values))
                    if bad:
                        raise NonFiniteLoss(bad, state["step"] + 1, ckpt_path, saved_step, rank)
                    fabric.backward(terms["loss"] / accumulate)
                for k, v in values.items():
                    window["terms"][k] = window["terms"].get(k, 0.0) + v / accumulate
                if not is_step:
                    continue
                _clip_gradients(fabric, model, optimizer, budget.grad_clip, state["step"] + 1, ckpt_path, saved_step)
                optimizer.step()
                step_end()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] += 1
                window["steps"] += 1
                bar.update(1)
                if state["step"] % budget.log_every == 0:
                    row = _log_row(fabric, window, state["step"], epoch, scheduler.get_last_lr()[0])
                    window = _empty_window()
                    state["history"].append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    if tracker:
                        tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")},
                                            state["step"])
                if state["step"] >= steps_per_epoch * (epoch + 1):
                    break  # a stop request is acted on after the epoch's evaluation and checkpoint
                signum = stop.agreed(fabric)
                if signum or (budget.checkpoint_every and state["step"] % budget.checkpoint_every == 0):
                    state["batch"], state["ranks"] = i + 1, _per_rank(fabric, window)
                    _save_checkpoint(fabric, ckpt_path, state, best_state)
                    saved_step = state["step"]
                if signum:
                    raise Interrupted(signum, state["step"], total_steps, ckpt_path, rank)
            model.eval()
            dev = evaluate_fn(model)
            dev_row = {"step": state["step"], "epoch": epoch, **{f"dev_{k}": v for k, v in dev.items()}}
            state["history"].append(dev_row)
            if tracker:
                tracker.log_metrics({f"dev_{k}": v for k, v in dev.items()}, state["step"])
            fabric.print(f"epoch {epoch}: " + ", ".join(f"dev {k} {v:.4f}" for k, v in dev.items()))
            if dev[monitor] > state["best"]["value"]:
                state["best"] = {"epoch": epoch, "value": dev[monitor], "dev": dev}
                best_state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
            state["epoch"], state["batch"], state["ranks"] = epoch + 1, 0, _per_rank(fabric, _empty_window())
            if fabric.is_global_zero:
                write_curve(Path(curve_path), state["history"])
            _save_checkpoint(fabric, ckpt_path, state, best_state)
            saved_step = state["step"]
            signum = stop.agreed(fabric)
            if signum and epoch + 1 < budget.epochs:  # after the last epoch there is nothing left to stop
                raise Interrupted(signum, state["step"], total_steps, ckpt_path, rank)
    result = FitResult(best_state=best_state, best_epoch=state["best"]["epoch"], best_dev=state["best"]["dev"],
                       history=state["history"], steps=state["step"])
    return result


def global_batch(i: int, rank: int, world: int, accumulate: int) -> int:
    """Which batch of one process's epoch (accumulating ``accumulate × world``) is batch ``i`` of process ``rank``
    (accumulating ``accumulate``): :class:`EpochBatches` gives rank r the r-th contiguous share of each step."""
    return (i // accumulate) * accumulate * world + rank * accumulate + i % accumulate


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of micro-batch ``index`` (its place in the epoch's global order, as :class:`EpochBatches`
    shards it: process r of W takes the r-th contiguous share of each optimizer step's batches) of ``epoch``."""
    return zlib.crc32(np.array([seed, epoch, index], dtype=np.int64).tobytes())


def _step_end_hooks(fabric: Fabric, model: torch.nn.Module) -> Callable[[], None]:
    """A function that calls ``step_end(gather)`` on every submodule that has one (e.g.
    :class:`~vldistill.distill.losses.TokenNCE`, whose queue takes the step's keys) after each optimizer step: state
    that changes once per step, from every process's rows."""
    hooks = [module.step_end for module in _unwrap(model).modules() if callable(getattr(module, "step_end", None))]
    gather = None if fabric.world_size == 1 else (lambda rows: gather_rows(fabric, rows))

    def step_end() -> None:
        for hook in hooks:
            hook(gather)

    return step_end


def gather_rows(fabric: Fabric, rows: torch.Tensor) -> torch.Tensor:
    """``rows (N_r, ...)`` of each process → ``(Σ N_r, ...)`` on every process, rank 0's first (processes may hold
    different numbers of rows: each is padded to the largest for the collective)."""
    counts = fabric.all_gather(torch.tensor([len(rows)], device=rows.device)).reshape(-1).tolist()
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: len(rows)] = rows
    gathered = fabric.all_gather(padded)  # (W, max N_r, ...)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


def _empty_window() -> dict:
    return {"terms": {}, "steps": 0}


def _log_row(fabric: Fabric, window: dict, step: int, epoch: int, lr: float) -> dict:
    """One curve row: each loss term averaged over the window's optimizer steps (and over processes, which makes it
    the number one process with the same effective batch would log)."""
    terms = {k: v / window["steps"] for k, v in window["terms"].items()}
    if fabric.world_size > 1:
        reduced = fabric.all_reduce({k: torch.tensor(v, dtype=torch.float64, device=fabric.device)
                                     for k, v in terms.items()}, reduce_op="mean")
        terms = {k: float(v) for k, v in reduced.items()}
    return {"step": step, "epoch": epoch, "lr": lr, **terms}


def _epoch_batches(loader, train_loader, batches: EpochBatches | None, epoch: int, seed: int, skip: int):
    """Epoch ``epoch``'s batches (order fixed by ``seed`` and ``epoch``) from the ``skip``-th on, on the device.

    :class:`EpochBatches` skips by index; another DataLoader (sampler epoch / generator reseeded, as before) has
    its first ``skip`` batches drawn and dropped. Fabric's own per-iteration ``set_epoch`` reaches only
    ``loader.sampler``, never the batch sampler, so the epoch set here is the one iterated.
    """
    if batches is not None:
        batches.set_epoch(epoch, skip)
        return loader
    if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if getattr(train_loader, "generator", None) is not None:
        train_loader.generator.manual_seed(seed + epoch)
    return itertools.islice(loader, skip, None)


def _resume(fabric: Fabric, path: Path, state: dict) -> tuple[bool, dict | None]:
    """Load ``last.ckpt`` into ``state`` if it was written for these inputs; return whether it was, and the best
    model state it holds.

    A mid-epoch checkpoint (``batch`` > 0) resumes only with the process count that wrote it (its data position,
    random streams and unlogged loss sums are per process); an epoch-end one resumes with any.
    """
    if not path.is_file():
        return False, None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("fingerprint") != state["fingerprint"]:
        fabric.print(f"ignoring {path}: it was written for different inputs")
        return False, None
    if saved.get("batch") and len(saved.get("ranks", [])) != fabric.world_size:
        fabric.print(f"ignoring {path}: written mid-epoch by {len(saved['ranks'])} processes, this run has "
                     f"{fabric.world_size}")
        return False, None
    fabric.load(path, state)
    fabric.print(f"resuming from {path} at epoch {state['epoch']}, batch {state['batch']} (step {state['step']})")
    return True, saved.get("best_model")


def _clip_gradients(fabric: Fabric, model, optimizer, max_norm: float, step: int, ckpt_path: Path,
                    saved_step: int | None) -> None:
    """Clip to ``max_norm``; a NaN or infinite gradient norm (finite loss, overflow in backward) stops training with
    :class:`NonFiniteLoss` before the optimizer applies it (Fabric checks, ``error_if_nonfinite``)."""
    try:
        fabric.clip_gradients(model, optimizer, max_norm=max_norm)
    except RuntimeError as err:
        if "non-finite" not in str(err):
            raise
        raise NonFiniteLoss("gradient norm is nan or inf (every loss term finite)", step, ckpt_path,
                            saved_step, fabric.global_rank) from None


def _rng_state() -> dict:
    """This process's random streams (torch CPU and CUDA, python ``random``, numpy) as tensors and plain values, so
    that a checkpoint holding them still loads with ``weights_only=True``."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                            "pos": int(numpy_state["state"]["pos"])}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Inverse of :func:`_rng_state`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": state["numpy"]["state"]["key"].numpy().astype(np.uint32),
                            "pos": state["numpy"]["state"]["pos"]}
    np.random.set_state(numpy_state)


def _per_rank(fabric: Fabric, window: dict) -> list[dict]:
    """Every process's ``{"rng": _rng_state(), "window": window}`` (its loss sums not logged yet), indexed by global
    rank (a collective when there are several)."""
    mine = {"rng": _rng_state(), "window": window}
    if fabric.world_size == 1:
        return [mine]
    states = [None] * fabric.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _save_checkpoint(fabric: Fabric, path: Path, state: dict, best_state) -> None:
    """Write ``last.ckpt`` via a temporary name (rank 0 renames), so a crash never leaves a truncated checkpoint."""
    tmp = path.with_suffix(".ckpt.tmp")
    if fabric.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    try:
        fabric.save(tmp, {**state, "best_model": best_state})
    except BaseException:  # e.g. disk full, or a second Ctrl-C: the previous last.ckpt stays as it was
        if fabric.is_global_zero:
            tmp.unlink(missing_ok=True)
        raise
    fabric.barrier()
    if fabric.is_global_zero:
        os.replace(tmp, path)


def clear_checkpoints(fabric: Fabric, ckpt_dir: str | Path) -> None:
    """Remove a finished stage's resume checkpoints (its outputs are the DVC-tracked model directory)."""
    fabric.barrier()
    if fabric.is_global_zero:
        shutil.rmtree(ckpt_dir, ignore_errors=True)

