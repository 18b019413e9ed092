"""How training stops before its end on purpose: a stop signal (Ctrl-C, ``kill``, SLURM) or a non-finite loss.

:func:`vldistill.train.loop.fit` raises a :class:`TrainingStopped`; the stage entry point turns it into one line on
stderr, ``<prefix>: <stage>: <str(err)>``, and exit status ``exit_code`` (see :func:`vldistill.cli.stage_errors`).
Either way the stage writes none of its outputs, so DVC does not record it as done.

A stop signal (SIGINT, SIGTERM) is only remembered when it arrives; training acts on it at the next optimizer step
boundary: every process writes the resume checkpoint at that step, then raises :class:`Interrupted`. A rerun resumes
from that checkpoint exactly as from a ``checkpoint_every`` one. A second Ctrl-C aborts at once (no checkpoint).
"""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped before its end; ``str(err)`` is the reason in one line, ``exit_code`` the process's exit status
    and ``prefix`` the word the line starts with."""

    exit_code = 1
    prefix = "error"
    report = True  # whether this process prints the line (under DDP only one does for an interruption)


class Interrupted(TrainingStopped):
    """A stop signal arrived; the resume checkpoint holds the state after optimizer step ``step``."""

    prefix = "interrupted"

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Path, rank: int = 0):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        # Exit status 128 + signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by it.
        # Under DDP only rank 0 reports and fails; the others exit 0, so that Fabric's launcher, which SIGKILLs every
        # process when one of its children exits non-zero, does not kill rank 0 before it has said where it stopped.
        self.exit_code = 128 + signum if rank == 0 else 0
        self.report = rank == 0
        super().__init__(f"{signal.Signals(signum).name} at step {step} of {total_steps}; checkpoint saved to "
                         f"{checkpoint}; rerun the stage (e.g. dvc repro) to resume from there")


class NonFiniteLoss(TrainingStopped, FloatingPointError):
    """A loss term (or the gradient norm) was NaN or infinite at optimizer step ``step`` (1-based, the step being
    computed); nothing of that step was applied, and the last checkpoint written before it is kept as it was."""

    def __init__(self, what: str, step: int, checkpoint: Path, checkpoint_step: int | None, rank: int = 0):
        self.step, self.checkpoint, self.checkpoint_step = step, checkpoint, checkpoint_step
        # Under several processes every one stops at the same step (see agreed_non_finite); only rank 0 reports and
        # fails, the others exit 0 (as for Interrupted: Fabric's launcher would kill rank 0 before it says why).
        self.exit_code = 1 if rank == 0 else 0
        self.report = rank == 0
        kept = (f"last good checkpoint kept at {checkpoint} (step {checkpoint_step})" if checkpoint_step is not None
                else "no checkpoint was written before it")
        super().__init__(f"{what} at step {step}; {kept}")


def non_finite_terms(values: dict[str, float]) -> str | None:
    """``None`` if every loss term is finite, else what was not, e.g. ``loss term 'soft' is nan``. The total
    ``loss`` is named only when no other term explains it."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return None
    parts = {k: v for k, v in bad.items() if k != "loss"} or bad
    if len(parts) == 1:
        (name, value), = parts.items()
        return f"loss term '{name}' is {value}"
    return "loss terms " + ", ".join(f"'{k}' ({v})" for k, v in parts.items()) + " are not finite"


def agreed_non_finite(fabric, bad: str | None) -> str | None:
    """``bad`` (:func:`non_finite_terms` of this process) made the same on every process: ``None`` when every
    process's terms are finite, else what was not and where, e.g. ``loss term 'soft' is nan on process 1``.

    One all-reduce of a flag per micro-batch under several processes (none with one), so that a NaN seen by one
    process stops all of them before the backward pass whose gradient all-reduce the others would wait in forever.
    """
    if fabric.world_size == 1:
        return bad
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(bad is not None)], dtype=torch.int32, device=fabric.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return None
    seen: list[str | None] = [None] * fabric.world_size
    dist.all_gather_object(seen, bad)
    return "; ".join(f"{what} on process {rank}" for rank, what in enumerate(seen) if what)


class StopSignals:
    """Context manager: while active (in the main thread), SIGINT and SIGTERM set :attr:`signum` instead of ending the
    process; a second SIGINT raises :class:`KeyboardInterrupt` at once. The previous handlers come back on exit. A
    signal the process was started ignoring (``nohup``-style, a shell's background job) stays ignored.

    ``announce``: write one line to stderr when the first signal arrives (the process that reports).
    """

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum:
            return
        self.signum = signum
        if self.announce:  # os.write: no buffered I/O inside a signal handler
            hint = " (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""
            os.write(2, f"\n{signal.Signals(signum).name}: stopping at the end of this optimizer step with a "
                        f"checkpoint{hint}\n".encode())

    def agreed(self, fabric) -> int:
        """The signal every process acts on (0: none): this process's alone, or under several processes the largest
        any of them received, so that all stop at the same step (one collective)."""
        if fabric.world_size == 1:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int32, device=fabric.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
