"""Teachers from the ViLT checkpoints that params name: ``teacher.init`` (instead of pre-training here) and
``teacher.finetuned.<task>`` (instead of fine-tuning here).

A source is a hub id (``dandelin/vilt-b32-mlm``) or a local directory: transformers' ``save_pretrained`` of a ViLT
class, or one written by :meth:`ViltTeacher.save`. Local sources are checked by :func:`check_sources` before a
stage does any work; every problem is one line naming the params key (``teacher.init``, ``teacher.finetuned.vqa``).

Two things differ from a teacher trained here, and are handled on loading:

- ``dandelin/vilt-b32-mlm`` is a ``ViltForMaskedLM`` checkpoint: it holds the MLM head but not ViLT's ITM head, so
  ``itm_score`` starts freshly initialised. Downstream it is read by ``distill_pretrain`` (the teacher's ITM soft
  labels, knowledge ``soft``: they carry no knowledge until the head is trained) and as the start of the retrieval
  head ``rank_output`` (ViLT's IRTR recipe), which then starts random instead; nothing else uses it.
- Its token-type embedding has 2 rows (text, image); NLVR2 needs a third for the second image. It is added as a copy
  of the image row, as ViLT does when it starts NLVR2 fine-tuning (checkpoints that have 3 rows are kept as they are).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import ViltConfig

from vldistill.config import ConfigError, TeacherParams, is_local_form
from vldistill.models.teacher import HF_ARCHITECTURES, ViltTeacher

IMAGE_TYPES = 3
"""Modality types every teacher carries: text 0, image 1, NLVR2's second image 2."""
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FITTING_KNOBS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                 "intermediate_size": "intermediate_size", "patch_size": "patch_size",
                 "max_text_len": "max_position_embeddings"}
"""``teacher.*`` knobs a loaded checkpoint must agree with → the ViltConfig attribute that holds each."""


def is_local(source: str) -> bool:
    """A local directory (existing, or written as a path), as opposed to a hub id ``owner/name``."""
    return is_local_form(source) or Path(source).expanduser().is_dir()


def _where(key: str, source: str) -> str:
    return f"{key}={json.dumps(source)}"


def check_source(source: str, key: str) -> None:
    """A local source must be a ViLT checkpoint directory (``config.json`` with ``model_type: vilt`` and weights);
    a hub id passes (it is resolved, from the cache or the network, when loaded). Raises :class:`ConfigError`."""
    if not is_local(source):
        return
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{_where(key, source)}: local directory not found")
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{_where(key, source)}: not a ViLT checkpoint directory (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "vilt":
        raise ConfigError(f"{_where(key, source)}: {config} is a {model_type!r} checkpoint, not ViLT")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"{_where(key, source)}: no weights (one of {', '.join(WEIGHT_FILES)})")


def check_sources(teacher: TeacherParams) -> None:
    """:func:`check_source` for ``teacher.init`` (unless ``scratch``) and every ``teacher.finetuned`` entry."""
    if teacher.init != "scratch":
        check_source(teacher.init, "teacher.init")
    for task, source in teacher.finetuned.items():
        check_source(source, f"teacher.finetuned.{task}")


def check_sources_or_exit(teacher: TeacherParams) -> None:
    """:func:`check_sources` for stage entry points: the one line to stderr and exit status 2 (as a bad param)."""
    try:
        check_sources(teacher)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def checkpoint_heads(source: str) -> tuple[str, ...]:
    """The heads a checkpoint holds: ``heads.json`` of :meth:`ViltTeacher.save`, else its transformers class."""
    heads_file = Path(source).expanduser() / "heads.json"
    if is_local(source) and heads_file.is_file():
        return tuple(json.loads(heads_file.read_text())["heads"])
    arch = (ViltConfig.from_pretrained(str(source)).architectures or ["ViltModel"])[0]
    if arch not in HF_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not a ViLT class with heads (known: {sorted(HF_ARCHITECTURES)})")
    return HF_ARCHITECTURES[arch]


def add_image_types(teacher: ViltTeacher, types: int = IMAGE_TYPES) -> ViltTeacher:
    """Grow the token-type embedding to ``types`` rows, new rows copied from the image row (1), as ViLT does for
    NLVR2; ``config.modality_type_vocab_size`` follows. ``(types_old, D)`` → ``(types, D)``; a no-op when enough."""
    old = teacher.vilt.embeddings.token_type_embeddings
    if old.num_embeddings >= types:
        return teacher
    grown = nn.Embedding(types, old.embedding_dim).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        grown.weight[: old.num_embeddings] = old.weight
        grown.weight[old.num_embeddings:] = old.weight[1]
    teacher.vilt.embeddings.token_type_embeddings = grown
    teacher.config.modality_type_vocab_size = types
    return teacher


def check_fits(teacher: ViltTeacher, params: TeacherParams, key: str, source: str) -> None:
    """Each ``teacher.*`` size knob must equal the loaded checkpoint's; raises :class:`ConfigError` naming it."""
    for knob, attr in FITTING_KNOBS.items():
        want, have = getattr(params, knob), getattr(teacher.config, attr)
        if want != have:
            raise ConfigError(f"teacher.{knob}={want}: the checkpoint {_where(key, source)} has {have}")


def load_init_teacher(init: str, heads: tuple[str, ...] = ("mlm", "itm"), *, fresh: tuple[str, ...] = ("itm",),
                      params: TeacherParams | None = None, key: str = "teacher.init") -> ViltTeacher:
    """A teacher with ``heads`` from the checkpoint ``init`` (hub id or local directory), with 3 modality types.

    Heads the checkpoint holds keep their weights; heads in ``fresh`` that it lacks start random (by default the
    ITM head, absent from ``dandelin/vilt-b32-mlm``; see the module docstring); any other missing head is an error.
    With ``params``, its size knobs must match the checkpoint (:func:`check_fits`). Every problem raises
    :class:`ConfigError` with one line naming ``key``.
    """
    check_source(init, key)
    try:
        saved = checkpoint_heads(init)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{_where(key, init)}: cannot read the checkpoint ({_first_line(err)})") from None
    missing = [h for h in heads if h not in saved and h not in fresh]
    if missing:
        raise ConfigError(f"{_where(key, init)}: the checkpoint holds heads {list(saved)}, not {missing}")
    try:
        if is_local(init) and (Path(init).expanduser() / "heads.json").is_file():
            teacher = ViltTeacher.load(Path(init).expanduser(), heads=tuple(heads))
        else:
            teacher = ViltTeacher.from_pretrained(init, heads=tuple(heads))
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{_where(key, init)}: cannot load ({_first_line(err)})") from None
    if params is not None:
        check_fits(teacher, params, key, init)
    return add_image_types(teacher)


def load_finetuned_teacher(params: TeacherParams, task: str) -> ViltTeacher:
    """The teacher of ``task`` from ``teacher.finetuned.<task>``: its task head must be in the checkpoint."""
    if task not in params.finetuned:
        raise ConfigError(f"teacher.finetuned.{task}: not set (the pipeline fine-tunes this task's teacher)")
    return load_init_teacher(params.finetuned[task], (task,), fresh=(), params=params, key=f"teacher.finetuned.{task}")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
