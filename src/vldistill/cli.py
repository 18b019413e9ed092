"""What every stage entry point shares: argument parsing and params loading with one-line errors, and the one line
a training stage ends with when training stops early."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from vldistill.config import Params, load_or_exit


def stage_args(description: str, task: bool = False, variant: bool = False, any_data_task: bool = False,
               seed: bool = False) -> tuple[argparse.Namespace, Params]:
    """Parse ``--params`` (default params.yaml), optional ``--task`` / ``--variant`` / ``--seed`` and ``-S key=value``
    overrides;
    validate the params before any work starts (exit status 2 with one line on error)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run only, e.g. -S distill.layers=layerwise")
    if task:
        parser.add_argument("--task", required=True)
    if variant:
        parser.add_argument("--variant", required=True)
    if seed:
        parser.add_argument("--seed", required=True, type=int)
    args = parser.parse_args()
    params = load_or_exit(args.params, args.set)
    if any_data_task:  # prepare: every task with a data section, enabled or not
        allowed = [name for name in type(params.data).model_fields if name != "scene" and getattr(params.data, name)]
        if args.task not in allowed:
            parser.exit(2, f"error: --task {args.task!r}: no data.{args.task} section (have: {allowed})\n")
    elif task and args.task not in ("pretrain", *params.tasks):
        parser.exit(2, f"error: --task {args.task!r}: not an enabled task (tasks: {list(params.tasks)})\n")
    if variant and args.variant not in params.variants:
        parser.exit(2, f"error: --variant {args.variant!r}: not in variants (defined: {sorted(params.variants)})\n")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen under `dvc repro`
    return args, params


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
