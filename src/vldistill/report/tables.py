"""Table and figure builders for the report notebooks. Every number is read from this run's metrics files; a missing
file makes its cells say so instead of showing a stale or typed value."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

MODEL_LABELS = {
    "teacher": "ViLT teacher (fusion encoder)",
    "dual_gt": "Dual encoder, ground-truth labels only",
    "dide": "DiDE (distilled dual encoder)",
}


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def missing(path: str | Path) -> str:
    return f"missing: {path}"


def _percent(value: float | None, decimals: int) -> str | None:
    return None if value is None else f"{100 * value:.{decimals}f}"


def main_results(metrics_dir: str | Path, task: str, models: list[str], decimals: int = 1,
                 batch_size: int = 1) -> pd.DataFrame:
    """Rows: models; columns: dev / test accuracy (%) and ms per example (uncached and with cached images).

    Latency comes from ``metrics/bench/latency.json`` (teacher, and the DiDE student's architecture, shared by every
    dual-encoder variant)."""
    metrics_dir = Path(metrics_dir)
    latency_path = metrics_dir / "bench" / "latency.json"
    latency = read_json(latency_path)
    bench = ((latency or {}).get("embedded", {}).get(task, {}) or {}).get(str(batch_size))
    rows = []
    for model in models:
        path = metrics_dir / "eval" / task / f"{model}.json"
        scores = read_json(path)
        row = {"model": MODEL_LABELS.get(model, model)}
        for split in ("dev", "test"):
            value = None if scores is None else scores.get(split, {}).get("accuracy")
            row[f"{task} {split} acc. (%)"] = _percent(value, decimals) or missing(path)
        key = "teacher_ms" if model == "teacher" else "dual_ms"
        row[f"ms/example (batch {batch_size})"] = (f"{bench[key]:.3f}" if bench else missing(latency_path))
        row[f"ms/example, images cached (batch {batch_size})"] = (
            "n/a (fusion)" if model == "teacher" else f"{bench['dual_cached_ms']:.3f}" if bench else missing(latency_path))
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def curves(plots_dir: str | Path, task: str, variants: list[str]) -> dict[str, pd.DataFrame]:
    """Training curves ``{name: frame}`` for the task's teacher fine-tuning and each student variant (those present)."""
    plots_dir = Path(plots_dir)
    found = {"teacher": plots_dir / "train" / "teacher_finetune" / f"{task}.csv"}
    found |= {v: plots_dir / "train" / "distill_finetune" / task / f"{v}.csv" for v in variants}
    return {name: pd.read_csv(path) for name, path in found.items() if path.is_file()}


def plot_curves(frames: dict[str, pd.DataFrame], metric: str, out: str | Path, title: str) -> Path:
    """Dev ``metric`` (left) and training loss (right) against optimizer step, one line per model; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_dev, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, frame in frames.items():
        label = MODEL_LABELS.get(name, name)
        if f"dev_{metric}" in frame:
            dev = frame.dropna(subset=[f"dev_{metric}"])
            ax_dev.plot(dev["step"], 100 * dev[f"dev_{metric}"], marker="o", label=label)
        train = frame.dropna(subset=["loss"])
        ax_loss.plot(train["step"], train["loss"], label=label, alpha=0.8)
    ax_dev.set(xlabel="optimizer step", ylabel=f"dev {metric} (%)", title=f"{title}: dev {metric}")
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (weighted sum)", title=f"{title}: training loss",
                yscale="log")
    for ax in (ax_dev, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def data_summary(metrics_dir: str | Path, tasks: list[str]) -> pd.DataFrame:
    """One row per prepared task: examples per split, images, and the label (or top answer) distribution of train."""
    rows = []
    for task in tasks:
        path = Path(metrics_dir) / "data" / f"{task}.json"
        stats = read_json(path)
        if stats is None:
            rows.append({"task": task, "source": missing(path)})
            continue
        splits = stats["splits"]
        train = splits.get("train", {})
        answers = sorted(train.get("top_answers", {}).items(), key=lambda kv: -kv[1])[:4]
        spread = train.get("labels") or dict(answers)
        rows.append({"task": task, "source": stats["source"],
                     **{f"{s} examples": str(splits[s]["examples"]) for s in ("train", "dev", "test") if s in splits},
                     "images in store": str(stats["image_store"]["images"]),
                     "train labels / top answers": ", ".join(f"{k} {v}" for k, v in spread.items())})
    return pd.DataFrame(rows).set_index("task")
