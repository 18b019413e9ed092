"""MLflow tracking: one run per stage execution in experiment ``vldistill``.

The store defaults to ``sqlite:///<repository root>/mlflow.db``: ``$DVC_ROOT`` (which DVC sets to the repository it
was started in, also for experiments it runs in a temporary copy: ``dvc exp run --queue`` / ``--temp``) or else the
working directory (DVC runs stages from the repository root); the environment variable ``MLFLOW_TRACKING_URI``
overrides it. Several stages may write to the sqlite store at once (``dvc queue start -j 2``): opening the store
(which creates or migrates the database, and the experiment) is done by one process at a time, and a call that finds
the database locked is retried for up to :data:`LOCKED_RETRY_SECONDS`.

Tracking never fails a stage: if the store cannot be reached, one line on stderr says what was not logged, tracking is
off for the rest of the stage, and the stage goes on (its metrics files are on disk anyway). So that an unreachable
server costs seconds, not minutes, MLflow's HTTP client gets :data:`HTTP_FAST_FAIL` unless the environment sets those
variables itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vldistill.train.faults import Interrupted

EXPERIMENT = "vldistill"

HTTP_FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
"""MLflow's defaults are 7 retries with exponential backoff (factor 2) and 120 s per request: minutes before a call to
an unreachable server fails. Here: one immediate retry, 5 s per attempt (a refused connection fails at once, an
unanswered one after about 10 s, once per stage)."""

LOCKED_RETRY_SECONDS = 60.0
"""How long a call that finds the sqlite store locked by another process is retried."""


def tracking_uri() -> str:
    root = os.environ.get("DVC_ROOT") or Path.cwd()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root) / 'mlflow.db'}"


def _retry_locked(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried while sqlite says ``database is locked`` (another stage is writing)."""
    deadline, delay = time.monotonic() + LOCKED_RETRY_SECONDS, 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - MLflow wraps sqlite's OperationalError in its own exceptions
            if "database is locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 1.0)


@contextlib.contextmanager
def _sqlite_init_lock(uri: str, wait: float = LOCKED_RETRY_SECONDS):
    """For an sqlite store, hold an exclusive lock on ``<database>.lock`` while MLflow opens it: creating or migrating
    the database is not safe against a concurrent one (two stages starting together on a fresh store leave it
    half-migrated for good: "table _alembic_tmp_metrics already exists"), nor is creating the experiment. Other
    stores, or no ``fcntl``: no lock. Given up after ``wait`` seconds (then MLflow's own error, if any, is reported)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///").split("?")[0])
    try:
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError:
        yield
        return
    with lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _one_line(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Context manager around one MLflow run. ``enabled=False`` (or a failed connection) makes every call a no-op.

    Tags: ``stage``, ``task``, ``variant``, ``git_commit``, ``dvc_exp`` (the experiment name under ``dvc exp run``).
    """

    def __init__(self, stage: str, params: dict[str, Any], task: str | None = None, variant: str | None = None,
                 enabled: bool = True):
        self.stage, self.task, self.variant = stage, task, variant
        self.params = params
        self.enabled = enabled
        self._mlflow = None

    def _fail(self, what: str, err: Exception) -> None:
        print(f"warning: MLflow ({tracking_uri()}): {what} not logged, tracking off for the rest of this stage "
              f"({_one_line(err)}); metrics files on disk are unaffected", file=sys.stderr, flush=True)
        self.enabled = False

    def __enter__(self) -> "Tracker":
        if not self.enabled:
            return self
        try:
            logging.getLogger("alembic").setLevel(logging.WARNING)
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            for key, value in HTTP_FAST_FAIL.items():
                os.environ.setdefault(key, value)
            import mlflow

            self._mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri())
            with _sqlite_init_lock(tracking_uri()):  # the first call opens (creates, migrates) the store
                _retry_locked(mlflow.set_experiment, EXPERIMENT)
            name = "/".join(p for p in (self.stage, self.task, self.variant) if p)
            tags = {"stage": self.stage, "task": self.task or "", "variant": self.variant or "",
                    "git_commit": git_commit(), "dvc_exp": os.environ.get("DVC_EXP_NAME", "")}
            _retry_locked(mlflow.start_run, run_name=name, tags=tags)
            items = [(k, str(v)[:6000]) for k, v in self.params.items()]
            for i in range(0, len(items), 100):
                _retry_locked(mlflow.log_params, dict(items[i:i + 100]))
        except Exception as err:  # noqa: BLE001 - tracking must never fail a stage
            self._fail("run and params", err)
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or self._mlflow is None:
            return
        try:
            _retry_locked(self._mlflow.log_metrics, {k: float(v) for k, v in metrics.items()}, step=step)
        except Exception as err:  # noqa: BLE001
            self._fail("metrics" if step is None else f"metrics from step {step} on", err)

    def log_artifact(self, path: str | Path) -> None:
        if not self.enabled or self._mlflow is None or not Path(path).exists():
            return
        try:
            _retry_locked(self._mlflow.log_artifact, str(path))
        except Exception as err:  # noqa: BLE001
            self._fail(f"artifact {path}", err)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is not None and not self.enabled:
            # The store failed: forget the run here rather than let MLflow's exit hook call the store once more.
            with contextlib.suppress(Exception):
                from mlflow.tracking import fluent

                fluent._active_run_stack.get().clear()
        elif self._mlflow is not None:
            interrupted = exc_type is not None and issubclass(exc_type, (Interrupted, KeyboardInterrupt))
            try:
                _retry_locked(self._mlflow.end_run,
                              status="FINISHED" if exc_type is None else "KILLED" if interrupted else "FAILED")
            except Exception as err:  # noqa: BLE001
                self._fail("run end", err)
