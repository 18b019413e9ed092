"""Which params a stage reads, so a test can check them against the params ``dvc.yaml`` declares for the stage (a
key read but not declared would leave the stage's outputs stale when it changes).

With ``VLDISTILL_PARAMS_AUDIT=<dir>`` in the environment, :func:`vldistill.cli.stage_args` calls :func:`watch` once
its own start checks are done: from then on every field read on the loaded params (``params.train.lr`` records
``train.lr``; a section dumped whole, e.g. for MLflow, records the section) is noted, and at exit the stage writes
``<dir>/<pid>.json`` = ``{"argv": [...], "keys": [...]}``. Reads of objects derived from the params (a variant's
resolved recipe) are seen where they are derived: :meth:`Params.variant` dumps ``distill``, which records it.
Off (the default), nothing is patched."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from pydantic import BaseModel

from vldistill.config import Strict

ENV = "VLDISTILL_PARAMS_AUDIT"
WHOLE = ("model_dump", "model_dump_json", "model_copy")
"""Methods that read every field of a section."""


def _node_paths(model: BaseModel, prefix: str = "") -> dict[int, str]:
    """``{id(section): dotted path}`` for ``model`` and every section (or dict of sections) below it."""
    found = {id(model): prefix}
    for name in type(model).model_fields:
        value = object.__getattribute__(model, name)
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, BaseModel):
            found |= _node_paths(value, key)
        elif isinstance(value, dict):
            for item, section in value.items():
                if isinstance(section, BaseModel):
                    found |= _node_paths(section, f"{key}.{item}")
    return found


def _is_section(value) -> bool:
    """A section, or a dict of sections: reading it reads nothing yet (its fields are recorded when read)."""
    if isinstance(value, BaseModel):
        return True
    return isinstance(value, dict) and bool(value) and all(isinstance(v, BaseModel) for v in value.values())


def watch(params: BaseModel) -> None:
    """Record the fields read on ``params`` from now on (see the module docstring); a no-op unless ``ENV`` is set."""
    out_dir = os.environ.get(ENV)
    if not out_dir:
        return
    nodes, keys = _node_paths(params), set()
    base, original = Strict, Strict.__getattribute__

    def recording(self, name):
        value = original(self, name)
        path = nodes.get(id(self))
        if path is None or name.startswith("_"):
            return value
        if name in WHOLE:
            keys.add(path)
        elif name in type(self).model_fields and not _is_section(value):
            keys.add(f"{path}.{name}" if path else name)
        return value

    base.__getattribute__ = recording

    def write() -> None:
        base.__getattribute__ = original
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        record = {"argv": sys.argv, "keys": sorted(keys)}
        (Path(out_dir) / f"{os.getpid()}.json").write_text(json.dumps(record, indent=1))

    atexit.register(write)
