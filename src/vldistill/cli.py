"""What every stage entry point shares: argument parsing and params loading with one-line errors, and the one line
a training stage ends with when training stops early."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from vldistill import params_audit
from vldistill.config import TASKS, FabricParams, Params, load_or_exit
from vldistill.memory import return_large_blocks

FABRIC_STAGES = ("teacher_pretrain", "teacher_finetune", "distill_pretrain", "distill_finetune", "evaluate")
"""Stages (``stages/<name>.py``) that train or evaluate through Lightning Fabric with ``fabric.*``: this machine is
checked against ``fabric.*`` before they start (:func:`machine_error`)."""


def stage_args(description: str, task: bool = False, variant: bool = False, any_data_task: bool = False,
               check: Callable[[argparse.Namespace, Params], str | None] | None = None,
               ) -> tuple[argparse.Namespace, Params]:
    """Parse ``--params`` (default params.yaml), optional ``--task`` / ``--variant`` and ``-S key=value``
    overrides;
    validate the params before any work starts (exit status 2 with one line on error). Then, before any work too:
    ``check(args, params)``, the stage's own check (prepare: that an official source's directories exist or can be
    downloaded), whose non-None answer is the error line, and for a training stage that this machine has the
    accelerator, devices and precision ``fabric.*`` asks for."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run only, e.g. -S distill.layers=layerwise")
    if task:
        parser.add_argument("--task", required=True)
    if variant:
        parser.add_argument("--variant", required=True)
    args = parser.parse_args()
    params = load_or_exit(args.params, args.set)
    if any_data_task:  # prepare: every task with a data section, enabled or not
        allowed = [name for name in ("pretrain", *TASKS) if getattr(params.data, name)]
        if args.task not in allowed:
            parser.exit(2, f"error: --task {args.task!r}: no data.{args.task} section (have: {allowed})\n")
    elif task and args.task not in ("pretrain", *params.tasks):
        parser.exit(2, f"error: --task {args.task!r}: not an enabled task (tasks: {list(params.tasks)})\n")
    if variant and args.variant not in params.variants:
        parser.exit(2, f"error: --variant {args.variant!r}: not in variants (defined: {sorted(params.variants)})\n")
    problem = check(args, params) if check is not None else None
    if problem:
        parser.exit(2, f"error: {problem}\n")
    if Path(sys.argv[0]).stem in FABRIC_STAGES:
        problem = machine_error(params.fabric)
        if problem:
            parser.exit(2, f"error: {problem}\n")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return_large_blocks()  # freed batches go back to the OS (vldistill.memory says why)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen under `dvc repro`
    params_audit.watch(params)  # only with VLDISTILL_PARAMS_AUDIT set: which params the stage reads (a test)
    return args, params


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def machine_error(fabric: FabricParams) -> str | None:
    """What this machine cannot give ``fabric.*``, as one line naming the key; None when it fits.

    ``cpu``: ``devices`` is a number of processes (gloo), at most one per CPU core available here. ``cuda``/``gpu``:
    a visible CUDA GPU, ``devices`` at most ``torch.cuda.device_count()`` (per node; not checked under SLURM, whose
    tasks may each see only their own GPU), bf16 precisions only on GPUs with native bf16 (compute capability >= 8.0).
    ``mps``: available, one device. ``auto`` is resolved as Lightning does (cuda, then mps, then cpu).
    """
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    accelerator = fabric.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    elif accelerator == "gpu":
        accelerator = "mps" if mps and not torch.cuda.is_available() else "cuda"
    shown = f"fabric.accelerator={fabric.accelerator}"
    if accelerator == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return (f"{shown}: no CUDA GPU is visible on this machine (torch {torch.__version__}, {build}{hint}); "
                    "use fabric.accelerator=cpu")
        if fabric.devices > count and "SLURM_PROCID" not in os.environ:
            return (f"fabric.devices={fabric.devices}: this machine has {count} CUDA GPU(s); fabric.devices is GPUs "
                    "per node, at most that many")
        if fabric.precision.startswith("bf16") and not _native_bf16(torch):
            return (f"fabric.precision={fabric.precision}: {torch.cuda.get_device_name(0)} has no native bfloat16 "
                    "(compute capability < 8.0); use '16-mixed' or '32-true'")
        return None
    if accelerator == "mps":
        if not mps:
            return f"{shown}: Apple MPS is not available on this machine; use fabric.accelerator=cpu"
        if fabric.devices != 1:
            return f"fabric.devices={fabric.devices}: MPS has one device; use fabric.devices=1"
        return None
    if fabric.precision == "16-mixed":  # accelerator: auto on a machine without a GPU
        return (f"fabric.precision=16-mixed: needs a GPU and {shown} found none here; use '32-true' or 'bf16-mixed' "
                "on cpu")
    if fabric.strategy == "dp":
        return f"fabric.strategy={fabric.strategy}: needs a GPU and {shown} found none here; use 'ddp' on cpu"
    cores = cpu_cores()
    if fabric.devices > cores:
        return (f"fabric.devices={fabric.devices}: on cpu each device is a process, and this machine has {cores} CPU "
                f"core(s) for this run; at most {cores}")
    return None


def _native_bf16(torch) -> bool:
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation flag
        return torch.cuda.get_device_capability(0) >= (8, 0)


@contextmanager
def stage_errors(stage: str) -> Iterator[None]:
    """Turn training that stopped early (:class:`vldistill.train.faults.TrainingStopped`: a stop signal, a non-finite
    loss) into one line on stderr, ``<prefix>: <stage>: <reason>``, and the exception's exit status (no traceback).

    ``stage`` names the stage as DVC does (``distill_finetune@nlvr2-dide``); under DVC its ``$DVC_STAGE`` wins.
    """
    from vldistill.train.faults import TrainingStopped

    try:
        yield
    except TrainingStopped as err:
        if err.report:
            print(f"{err.prefix}: {os.environ.get('DVC_STAGE') or stage}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None


def print_summary(line: str) -> None:
    """Print a stage's closing line once: every process of a multi-process run returns the summary, rank 0 prints."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(line)
