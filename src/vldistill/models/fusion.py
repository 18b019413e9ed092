"""The small fusion student (DistillVLM-style): a ViLT with fewer layers and/or a smaller width, and the loader
that opens any saved student (dual or fusion)."""

from __future__ import annotations

import copy
from pathlib import Path

from transformers import ViltConfig

from vldistill.config import StudentParams
from vldistill.distill.attention import layer_pairs
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher


def fusion_student(teacher: ViltTeacher, params: StudentParams, heads: tuple[str, ...]) -> ViltTeacher:
    """A ViLT of ``params.num_layers`` layers (default: half the teacher's) and ``params.hidden_size`` width
    (default: the teacher's), with the task ``heads``.

    ``init=teacher`` (same width only): embeddings, final norm, pooler and the head copied from the teacher, and
    student layer ``i`` from teacher layer ``round((i + 1) · L_t / L_s) − 1`` (the uniform mapping, e.g. every other
    layer at half depth). ``init=scratch``, or a different width: random weights.
    """
    t_cfg = teacher.config
    layers = params.num_layers or max(1, t_cfg.num_hidden_layers // 2)
    width = params.hidden_size or t_cfg.hidden_size
    num_heads = params.num_heads or t_cfg.num_attention_heads
    if width % num_heads:
        raise ValueError(f"student.hidden_size={width} must be a multiple of student.num_heads={num_heads}")
    config = ViltConfig(**{**t_cfg.to_dict(), "num_hidden_layers": layers, "hidden_size": width,
                           "num_attention_heads": num_heads,
                           "intermediate_size": t_cfg.intermediate_size * width // t_cfg.hidden_size})
    student = ViltTeacher(config, heads)
    if params.init == "teacher" and width == t_cfg.hidden_size:
        student.vilt.embeddings.load_state_dict(teacher.vilt.embeddings.state_dict())
        student.vilt.layernorm.load_state_dict(teacher.vilt.layernorm.state_dict())
        student.vilt.pooler.load_state_dict(teacher.vilt.pooler.state_dict())
        for s_layer, t_layer in layer_pairs(layers, t_cfg.num_hidden_layers, "layerwise"):
            student.vilt.encoder.layer[s_layer] = copy.deepcopy(teacher.vilt.encoder.layer[t_layer])
        for head in heads:
            if head in teacher.heads and head != "mlm":
                attr = {"itm": "itm_score", "nlvr2": "classifier", "vqa": "classifier", "snli_ve": "classifier",
                        "retrieval": "rank_output"}[head]
                setattr(student, attr, copy.deepcopy(getattr(teacher, attr)))
    return student


def load_student(path: str | Path):
    """Open a saved student: a dual encoder (``student.json``) or a fusion student (``heads.json``)."""
    path = Path(path)
    if (path / "student.json").is_file():
        return DualEncoder.load(path)
    if (path / "heads.json").is_file():
        return ViltTeacher.load(path)
    raise FileNotFoundError(f"{path}: no student checkpoint (student.json or heads.json) found")
