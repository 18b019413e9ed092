"""Where each stage reads and writes (the file contracts of the design notes), relative to the repository root."""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
TOKENIZER = Path("models/tokenizer")


def model_dir(stage: str, task: str | None = None, variant: str | None = None) -> Path:
    """``models/<stage>/<task>[/<variant>]`` (pre-training stages have no task)."""
    return Path("models", stage, *(p for p in (task, variant) if p))


def replica_name(variant: str, seed: int) -> str:
    """Model name of one seed's replica of a ``runs`` variant: ``<variant>_seed<seed>`` (metrics/eval, predictions)."""
    return f"{variant}_seed{seed}"


def replica_dir(task: str, variant: str, seed: int) -> Path:
    """``models/distill_finetune/<task>/<variant>/seed<seed>``: one seed's student of ``distill_finetune@<task>-<variant>``
    (the stage's output is the variant's folder, one sub-folder per seed of ``seeds``)."""
    return model_dir("distill_finetune", task, variant) / f"seed{seed}"


def replica_curve(task: str, variant: str, seed: int) -> Path:
    """``plots/train/distill_finetune/<task>/<variant>/seed<seed>.csv``: one replica's training curve."""
    return Path("plots/train/distill_finetune", task, variant, f"seed{seed}.csv")


def replica_metrics(task: str, variant: str, seed: int) -> Path:
    """``metrics/train/distill_finetune/<task>/<variant>/seed<seed>.json``: one replica's training summary."""
    return Path("metrics/train/distill_finetune", task, variant, f"seed{seed}.json")


def checkpoint_dir(stage: str, task: str | None = None, variant: str | None = None) -> Path:
    """Resume checkpoints of an unfinished stage (git-ignored, not a DVC output, so DVC does not delete them)."""
    return Path("checkpoints", stage, *(p for p in (task, variant) if p))


def curve_path(stage: str, task: str, variant: str | None = None) -> Path:
    """``plots/train/<stage>/<task>[/<variant>].csv``."""
    base = Path("plots/train", stage)
    return base / task / f"{variant}.csv" if variant else base / f"{task}.csv"


def train_metrics(stage: str, task: str, variant: str | None = None) -> Path:
    base = Path("metrics/train", stage)
    return base / task / f"{variant}.json" if variant else base / f"{task}.json"


def eval_metrics(task: str, model: str) -> Path:
    """``metrics/eval/<task>/<model>.json``."""
    return Path("metrics/eval", task, f"{model}.json")


def eval_ranking(task: str) -> Path:
    """``metrics/eval/<task>/ranking.meta.json`` (retrieval): ``{"<model>": {"ranking": "full" | "rerank@<k> by
    <dual variant>", "pairs_scored": {"<split>": joint passes}, "pairs_total": {"<split>": captions x images}}}``.
    Its name has a dot, which no model name has, so it is never taken for a model's metrics."""
    return Path("metrics/eval", task, "ranking.meta.json")


def predictions(task: str, model: str) -> Path:
    """``predictions/<task>/<model>.json``: per-example test predictions (VQA: the submission format)."""
    return Path("predictions", task, f"{model}.json")


def attention_figure(task: str) -> Path:
    """``reports/attention/<task>.png``: teacher vs student text→image attention on a few test examples."""
    return Path("reports/attention", f"{task}.png")


def data_metrics(task: str) -> Path:
    return Path("metrics/data", f"{task}.json")


def data_examples(task: str) -> Path:
    """``reports/data/<task>_examples.png``: a few prepared examples drawn with their text and label."""
    return Path("reports/data", f"{task}_examples.png")


LATENCY = Path("metrics/bench/latency.json")
