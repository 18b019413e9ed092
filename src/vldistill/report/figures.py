"""Figures of the report that a person would rather look at than read: the headline scores and speed-up, latency
bars, retrieval cost against the gallery size, and the ablation variants' dev curves. Each reads this run's files
and writes one PNG."""

from __future__ import annotations

from pathlib import Path

from vldistill.io import save_figure
from vldistill.report.tables import (TEACHER, deploy_rows, label, missing, plot_seed_band, read_json, replica_curves,
                                     seed_scores)

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
    """Dev ``metric`` against optimizer step for each ablation variant, mean over its seeds' curves
    (``plots/train/distill_finetune/<task>/<variant>/seed<k>.csv``; band: min–max); ``None`` when no curve exists."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for variant in variants:
        dev = replica_curves(plots_dir, task, variant, seeds, f"dev_{metric}") * 100
        if dev.empty:
            continue
        plot_seed_band(ax, [dev[seed] for seed in dev], marker="o", label=f"{variant} ({dev.shape[1]} seeds)")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="optimizer step", ylabel=f"dev {metric} (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out)


HEADLINE_MODELS = (TEACHER, "dide", "dual_gt")
"""The models of the headline figure (and of README's table): the teacher, DiDE and its ground-truth-only twin."""


def plot_headline(metrics_dir: str | Path, tasks: list[str], metrics: dict[str, str], seeds: list[int],
                  out: str | Path, batch_size: int = 1) -> Path:
    """Left: test score (%) of each task's main metric (``metrics[task]``; retrieval: mean recall) for the
    teacher, DiDE and dual-GT, bars at the mean over seeds with the 95% interval of the mean as error bar (the
    teacher is one run: no bar; a model without every seed's file is written as missing). Right, from
    ``metrics/bench/latency.json``: DiDE's speed-up over the teacher per timed task at ``batch_size``, per scale,
    uncached and with cached image representations."""
    plt = _pyplot()
    fig, (scores, speed) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    width, labelled = 0.27, set()
    for i, model in enumerate(HEADLINE_MODELS):
        for x, task in enumerate(tasks):
            summary, absent = seed_scores(metrics_dir, task, model, seeds, "test", metrics[task])
            at = x + (i - 1) * width
            if absent:
                scores.text(at, 1, "missing", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            error = None if summary.half_width is None else [[summary.half_width], [summary.half_width]]
            scores.bar(at, summary.mean, width, yerr=error, capsize=3, color=f"C{i}",
                       label=None if model in labelled else label(model))
            labelled.add(model)
            scores.annotate(f"{summary.mean:.1f}", (at, summary.mean + (summary.half_width or 0)),
                            textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    scores.set_xticks(range(len(tasks)), [f"{t}\n{metrics[t]}" for t in tasks])
    scores.set(ylabel="test score (%)", title=f"Test score: mean over seeds {seeds}, 95% interval (teacher: one run)")
    scores.legend(fontsize=8, loc="lower left")
    scores.grid(axis="y", alpha=0.3)
    latency = read_json(Path(metrics_dir) / "bench" / "latency.json") or {}
    bars = [(scale, key) for scale in ("embedded", "paper") if latency.get(scale)
            for key in ("speedup_uncached", "speedup_cached")]
    timed = [t for t in tasks if any(str(batch_size) in (latency[s].get(t) or {}) for s, _ in bars)]
    for i, (scale, key) in enumerate(bars):
        at = [x + (i - (len(bars) - 1) / 2) * 0.8 / len(bars) for x in range(len(timed))]
        values = [((latency[scale].get(t) or {}).get(str(batch_size)) or {}).get(key, 0) for t in timed]
        drawn = speed.bar(at, values, 0.8 / len(bars), color=f"C{i + len(HEADLINE_MODELS)}",
                          label=f"{scale}, {'images cached' if key == 'speedup_cached' else 'uncached'}")
        speed.bar_label(drawn, fmt="%.1f×", fontsize=7)
    speed.axhline(1, color="grey", linewidth=0.8, linestyle="--")
    speed.set_xticks(range(len(timed)), timed)
    speed.set(ylabel="teacher ms / DiDE ms", title=f"DiDE speed-up over the teacher (batch {batch_size})")
    if bars:
        speed.legend(fontsize=8)
    else:
        speed.text(0.5, 0.5, missing(Path(metrics_dir) / "bench" / "latency.json"), ha="center",
                   transform=speed.transAxes, fontsize=8)
    speed.grid(axis="y", alpha=0.3)
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
