"""Figures of the report that a person would rather look at than read: latency bars, retrieval cost against the
gallery size, and the ablation variants' dev curves. Each reads this run's files and writes one PNG."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vldistill.io import save_figure
from vldistill.report.tables import deploy_rows

MODEL_COLOURS = {"teacher": "tab:red", "dual": "tab:blue", "dual_cached": "tab:green"}
MODEL_NAMES = {"teacher": "ViLT teacher", "dual": "dual encoder", "dual_cached": "dual, images cached"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    return save_figure(fig, out, dpi=110)


def plot_latency(latency: dict, out: str | Path) -> Path:
    """Bars of ms/example (log scale) per task for teacher / dual / dual with cached images; one panel per scale and
    batch size; the cached speed-up over the teacher written above each group."""
    plt = _pyplot()
    panels = [(scale, size) for scale in ("embedded", "paper") for size in
              sorted({s for sizes in (latency.get(scale) or {}).values() for s in sizes}, key=int)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 4), squeeze=False)
    for ax, (scale, size) in zip(axes[0], panels):
        tasks = [t for t, sizes in latency[scale].items() if size in sizes]
        width = 0.27
        for i, model in enumerate(MODEL_COLOURS):
            values = [latency[scale][t][size][f"{model}_ms"] for t in tasks]
            ax.bar([x + (i - 1) * width for x in range(len(tasks))], values, width, color=MODEL_COLOURS[model],
                   label=MODEL_NAMES[model])
        for x, t in enumerate(tasks):
            row = latency[scale][t][size]
            ax.annotate(f"{row['speedup_cached']:.1f}×", (x, max(row["teacher_ms"], row["dual_ms"])),
                        textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_yscale("log")
        ax.set(ylabel="ms per example (median)", title=f"{scale} models, batch {size}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Latency per example (label: speed-up of the cached dual encoder over the teacher)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_retrieval_cost(cost: dict, out: str | Path) -> Path:
    """Seconds to score N images × 5N captions against N (log–log), dual encoder vs fusion teacher, one colour per
    scale; dashed where the number is extrapolated from a sample."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for scale, marker in (("embedded", "o"), ("paper", "s")):
        sizes = {int(n): r for n, r in (cost.get(scale) or {}).items() if isinstance(r, dict) and "dual_s" in r}
        if not sizes:
            continue
        ns = sorted(sizes)
        for model, key, colour in (("dual encoder", "dual_s", "tab:blue"), ("fusion teacher", "teacher_s", "tab:red")):
            extrapolated = any(sizes[n].get("teacher_extrapolated" if key == "teacher_s" else "dual_measured")
                               in (True, "extrapolated") for n in ns)
            ax.plot(ns, [sizes[n][key] for n in ns], marker=marker, color=colour, linestyle="--" if extrapolated else "-",
                    label=f"{model}, {scale}" + (" (extrapolated)" if extrapolated else ""))
    ax.set(xscale="log", yscale="log", xlabel="N images (5N captions)", ylabel="seconds to score every pair",
           title="Retrieval cost against gallery size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, out)


def plot_ablation_curves(plots_dir: str | Path, task: str, variants: list[str], seeds: list[int], metric: str,
                         out: str | Path, title: str) -> Path | None:
    """Dev ``metric`` against optimizer step for each ablation variant, mean over its seeds (band: min–max);
    ``None`` when no curve file exists."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for variant in variants:
        frames = []
        for seed in seeds:
            path = Path(plots_dir) / "train" / "distill_finetune" / task / f"{variant}_seed{seed}.csv"
            if path.is_file():
                frame = pd.read_csv(path)
                if f"dev_{metric}" in frame:
                    frames.append(frame.dropna(subset=[f"dev_{metric}"]).set_index("step")[f"dev_{metric}"] * 100)
        if not frames:
            continue
        joined = pd.concat(frames, axis=1)
        line = ax.plot(joined.index, joined.mean(axis=1), marker="o", label=f"{variant} ({len(frames)} seeds)")
        ax.fill_between(joined.index, joined.min(axis=1), joined.max(axis=1), color=line[0].get_color(), alpha=0.15)
        drawn = True
    if not drawn:
        _pyplot().close(fig)
        return None
    ax.set(xlabel="optimizer step", ylabel=f"dev {metric} (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out)


def plot_deploy(bench: dict, out: str | Path) -> Path:
    """Two panels from ``metrics/bench/deploy.json``: ms per example of each graph on PyTorch vs onnxruntime
    (log scale; one group per scale, graph and batch), and queries/s of exact vs approximate FAISS search against
    the gallery size (log–log), the approximate index's recall@10 written at each point."""
    plt = _pyplot()
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.2))
    groups = [(scale, graph, size) for scale, graph, size, _ in deploy_rows(bench)]
    for i, (runtime, colour) in enumerate((("torch", "tab:red"), ("onnx", "tab:blue"))):
        values = [bench["towers"][s][g][b][f"{runtime}_ms"] for s, g, b in groups]
        bars.bar([x + (i - 0.5) * 0.4 for x in range(len(groups))], values, 0.4, color=colour,
                 label={"torch": "PyTorch eager", "onnx": "onnxruntime"}[runtime])
    bars.set_xticks(range(len(groups)), [f"{s} {g} b{b}" for s, g, b in groups], fontsize=7, rotation=55,
                    ha="right")
    bars.set_yscale("log")
    bars.set(ylabel="ms per example (median)", title="towers and fusion head")
    bars.legend(fontsize=8)
    sizes = sorted(bench["faiss"], key=int)
    n = [int(s) for s in sizes]
    for way, colour in (("exact", "tab:gray"), ("approx", "tab:green")):
        kind = bench["faiss"][sizes[0]][way]["kind"]
        lines.plot(n, [bench["faiss"][s][way]["qps"] for s in sizes], "o-", color=colour, label=f"{way} ({kind})")
    for x, s in zip(n, sizes):
        lines.annotate(f"R@10 {bench['faiss'][s]['approx']['recall_at_10']:.2f}",
                       (x, bench["faiss"][s]["approx"]["qps"]), textcoords="offset points", xytext=(0, 5),
                       ha="center", fontsize=8)
    lines.set(xscale="log", yscale="log", xlabel="gallery size N", ylabel="queries / s",
              title="FAISS search over synthetic galleries")
    lines.legend(fontsize=8)
    for ax in (bars, lines):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)
