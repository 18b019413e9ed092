"""Shared fixtures: the repository root, the venv's python, and a tiny params override for end-to-end runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "data": {
        "pretrain": {"images": {"train": 64, "dev": 16, "test": 16}, "captions_per_image": 2},
        "nlvr2": {"pairs": {"train": 128, "dev": 32, "test": 32}},
        "snli_ve": {"pairs": {"train": 60, "dev": 15, "test": 15}},
        "retrieval": {"images": {"train": 20, "dev": 8, "test": 8}},
        "vqa": {"max_questions": {"train": 128, "dev": 32, "test": 32}},
    },
    "teacher": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "student": {"fusion_hidden": 32},
    "train": {stage: {"epochs": 1, "batch_size": 16, "lr": 1.0e-3, "log_every": 2}
              for stage in ("teacher_pretrain", "teacher_finetune", "distill_pretrain", "distill_finetune")},
    "bench": {"batch_sizes": [1, 4], "warmup": 1, "min_repeats": 3, "max_repeats": 5, "retrieval_max": 100,
              "retrieval_pairs": 32, "retrieval_batch": 64,
              "paper": {"batch_sizes": [1, 2], "warmup": 0, "min_repeats": 1, "max_repeats": 1, "threads": 1,
                        "architecture": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                                         "patch_size": 16, "image_size": [32, 48], "text_len": 8, "vocab_size": 120,
                                         "vqa_answers": 7, "fusion_hidden": 32}}},
    "deploy": {"bench": {"batch_sizes": [1, 4], "warmup": 1, "min_repeats": 2, "max_repeats": 3,
                         "gallery_sizes": [1000, 3000], "dim": 32, "queries": 20}},
}


TINY_RUNS = {f"{task}-{variant}": {"task": task, "variant": variant} for task, variant in (
    ("nlvr2", "dide"), ("nlvr2", "dual_gt"), ("nlvr2", "soft_attn_cross"), ("nlvr2", "fusion_soft"),
    ("snli_ve", "dide"), ("vqa", "dide"), ("vqa", "fusion_distillvlm"),
    ("retrieval", "dide"), ("retrieval", "fusion_distillvlm"))}
"""The fine-tuning distillation runs of the tiny pipeline: every task, both student kinds, one dual and one fusion
ablation variant on nlvr2; each trained once per seed of TINY_SEEDS."""

TINY_ABLATION = {"task": "nlvr2", "tables": {"knowledge": ["dual_gt", "soft_attn_cross"], "distillvlm": ["fusion_soft"]}}
TINY_SEEDS = [0, 1]


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def tiny_params_text() -> str:
    """params.yaml of the repo with the TINY override applied (same keys, minutes → seconds)."""
    params = deep_update(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["runs"] = TINY_RUNS
    params["ablation"] = TINY_ABLATION
    params["seeds"] = TINY_SEEDS
    return yaml.safe_dump(params, sort_keys=False)


@pytest.fixture
def python() -> str:
    return sys.executable
