"""MLflow tracking: one run per stage execution in experiment ``vldistill``.

The store defaults to ``sqlite:///<cwd>/mlflow.db`` (DVC runs stages from the repository root); the environment
variable ``MLFLOW_TRACKING_URI`` overrides it. Tracking never fails a stage: if the store cannot be reached, a warning
says what was not logged and the stage goes on (its metrics files are on disk anyway).
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

EXPERIMENT = "vldistill"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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
        warnings.warn(f"MLflow ({tracking_uri()}): {what} not logged ({type(err).__name__}: {err}); "
                      "metrics files on disk are unaffected", stacklevel=3)
        self.enabled = False

    def __enter__(self) -> "Tracker":
        if not self.enabled:
            return self
        try:
            logging.getLogger("alembic").setLevel(logging.WARNING)
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            import mlflow

            mlflow.set_tracking_uri(tracking_uri())
            mlflow.set_experiment(EXPERIMENT)
            name = "/".join(p for p in (self.stage, self.task, self.variant) if p)
            tags = {"stage": self.stage, "task": self.task or "", "variant": self.variant or "",
                    "git_commit": git_commit(), "dvc_exp": os.environ.get("DVC_EXP_NAME", "")}
            mlflow.start_run(run_name=name, tags=tags)
            items = [(k, str(v)[:6000]) for k, v in self.params.items()]
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
            self._mlflow = mlflow
        except Exception as err:  # noqa: BLE001 - tracking must never fail a stage
            self._fail("run and params", err)
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled or self._mlflow is None:
            return
        try:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        except Exception as err:  # noqa: BLE001
            self._fail(f"metrics at step {step}", err)

    def log_artifact(self, path: str | Path) -> None:
        if not self.enabled or self._mlflow is None or not Path(path).exists():
            return
        try:
            self._mlflow.log_artifact(str(path))
        except Exception as err:  # noqa: BLE001
            self._fail(f"artifact {path}", err)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mlflow is not None:
            try:
                self._mlflow.end_run(status="FINISHED" if exc_type is None else "FAILED")
            except Exception as err:  # noqa: BLE001
                self._fail("run end", err)
