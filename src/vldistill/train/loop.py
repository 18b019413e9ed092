"""The one training loop every training stage shares (Lightning Fabric).

    for epoch:                                   # seeds set per epoch, so a resumed run replays the same stream
        for batch: terms = model(batch)          # dict of loss terms, "loss" = weighted sum
                   backward (accumulated to effective_batch), clip, AdamW step, schedule step
        dev = evaluate_fn(model)                 # the model kept for test is the best on dev, never on test
        checkpoint(model, optimizer, scheduler, epoch, best, curve)

Checkpoints live outside DVC's outputs (``checkpoints/<stage>/...``) so that a rerun of an interrupted stage resumes
from the last finished epoch; they carry a fingerprint of the stage's inputs and are ignored when it differs.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from lightning_fabric import Fabric
from tqdm import tqdm

from vldistill.config import FabricParams, StageBudget
from vldistill.io import atomic_path
from vldistill.train.optim import param_groups, warmup_linear
from vldistill.train.tracking import Tracker

EvalFn = Callable[[torch.nn.Module], dict[str, float]]


def make_fabric(params: FabricParams, seed: int) -> Fabric:
    """Fabric from ``fabric.*``; launched (processes spawned under ddp when not already under torchrun/SLURM)."""
    fabric = Fabric(accelerator=params.accelerator, devices=params.devices, num_nodes=params.num_nodes,
                    strategy=params.strategy, precision=params.precision)
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


def _check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            raise FloatingPointError(f"non-finite loss term '{name}' = {value.item()} at step {step}; "
                                     "training stopped, the last good checkpoint is kept")


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
) -> FitResult:
    """Train ``model`` for ``budget.epochs`` epochs; keep the state with the best ``evaluate_fn(model)[monitor]``.

    ``model(batch)`` returns the loss terms ``{"loss": total, <term>: value}`` (see
    :class:`vldistill.train.objectives.Objective`); every term is checked to be finite at every step.
    """
    ckpt_path = Path(ckpt_dir) / "last.ckpt"
    world = fabric.world_size
    accumulate = max(1, (budget.effective_batch or budget.batch_size) // (budget.batch_size * world))
    steps_per_epoch = max(1, len(train_loader) // accumulate)
    total_steps = steps_per_epoch * budget.epochs

    optimizer = torch.optim.AdamW(param_groups(model, budget, head_prefixes), lr=budget.lr)
    scheduler = warmup_linear(optimizer, total_steps, budget.warmup_ratio)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(train_loader, use_distributed_sampler=world > 1)

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0, "step": 0,
             "best": {"epoch": -1, "value": -math.inf, "dev": {}}, "history": [], "fingerprint": fingerprint}
    best_state = None
    if ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if saved.get("fingerprint") == fingerprint:
            fabric.load(ckpt_path, state)
            best_state = saved.get("best_model")
            fabric.print(f"resuming from {ckpt_path} after epoch {state['epoch']} (step {state['step']})")
        else:
            fabric.print(f"ignoring {ckpt_path}: it was written for different inputs")

    bar = tqdm(total=total_steps, initial=state["step"], desc=str(curve_path), disable=not fabric.is_global_zero,
               dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    for epoch in range(state["epoch"], budget.epochs):
        torch.manual_seed(seed + 1000 * epoch + fabric.global_rank)  # dropout/masking stream, replayable on resume
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if getattr(train_loader, "generator", None) is not None:
            train_loader.generator.manual_seed(seed + epoch)
        model.train()
        running: dict[str, float] = {}
        window = 0  # optimizer steps accumulated in ``running`` since the last logged row
        for i, batch in enumerate(loader):
            is_step = (i + 1) % accumulate == 0
            with fabric.no_backward_sync(model, enabled=not is_step):
                terms = model(batch)
                _check_finite(terms, state["step"])
                fabric.backward(terms["loss"] / accumulate)
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + float(v.detach()) / accumulate
            if not is_step:
                continue
            fabric.clip_gradients(model, optimizer, max_norm=budget.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            window += 1
            bar.update(1)
            if state["step"] % budget.log_every == 0:
                row = {"step": state["step"], "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                       **{k: v / window for k, v in running.items()}}
                running, window = {}, 0
                state["history"].append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if tracker:
                    tracker.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch")}, state["step"])
            if state["step"] >= steps_per_epoch * (epoch + 1):
                break
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
        state["epoch"] = epoch + 1
        if fabric.is_global_zero:
            write_curve(Path(curve_path), state["history"])
        _save_checkpoint(fabric, ckpt_path, state, best_state)
    bar.close()
    result = FitResult(best_state=best_state, best_epoch=state["best"]["epoch"], best_dev=state["best"]["dev"],
                       history=state["history"], steps=state["step"])
    return result


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _save_checkpoint(fabric: Fabric, path: Path, state: dict, best_state) -> None:
    """Write ``last.ckpt`` via a temporary name (rank 0 renames), so a crash never leaves a truncated checkpoint."""
    tmp = path.with_suffix(".ckpt.tmp")
    if fabric.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    fabric.barrier()
    fabric.save(tmp, {**state, "best_model": best_state})
    fabric.barrier()
    if fabric.is_global_zero:
        os.replace(tmp, path)


def clear_checkpoints(fabric: Fabric, ckpt_dir: str | Path) -> None:
    """Remove a finished stage's resume checkpoints (its outputs are the DVC-tracked model directory)."""
    fabric.barrier()
    if fabric.is_global_zero:
        shutil.rmtree(ckpt_dir, ignore_errors=True)

