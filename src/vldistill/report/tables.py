"""Table and figure builders for the report notebooks. Every number is read from this run's metrics files; a missing
file makes its cells say so instead of showing a stale or typed value."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from vldistill.io import save_figure

MODEL_LABELS = {
    "teacher": "ViLT teacher (fusion encoder)",
    "dual_gt": "Dual encoder, ground-truth labels only",
    "dide": "DiDE (distilled dual encoder)",
    "fusion_gt": "Small fusion student, ground-truth labels only",
    "fusion_distillvlm": "Small fusion student, DistillVLM losses",
}

TASK_METRICS = {"nlvr2": ("accuracy",), "snli_ve": ("accuracy",), "vqa": ("vqa_score",),
                "retrieval": ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10")}
"""The metrics each task's table shows (names of ``metrics/eval/<task>/<model>.json``)."""
METRIC_LABELS = {"accuracy": "acc.", "vqa_score": "VQA score"}
SEED_SUFFIX = re.compile(r"_seed\d+$")


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def missing(path: str | Path) -> str:
    return f"missing: {path}"


def _percent(value: float | None, decimals: int) -> str | None:
    return None if value is None else f"{100 * value:.{decimals}f}"


def label(model: str) -> str:
    """Readable name of a model; seed replicas (``<variant>_seed<k>``) say which seed they are."""
    base = SEED_SUFFIX.sub("", model)
    seed = model[len(base) + len("_seed"):] if base != model else None
    return MODEL_LABELS.get(base, base) + (f" (seed {seed})" if seed else "")


def main_results(metrics_dir: str | Path, task: str, models: list[str], decimals: int = 1,
                 batch_size: int = 1, fusion_students: frozenset[str] = frozenset()) -> pd.DataFrame:
    """Rows: models; columns: the task's metrics (%) on dev and test (retrieval: test only), and ms per example
    (uncached and with cached images) where the task is timed.

    Latency comes from ``metrics/bench/latency.json`` (teacher, and the DiDE student's architecture, shared by every
    dual-encoder variant; fusion students are not timed there)."""
    metrics_dir = Path(metrics_dir)
    latency_path = metrics_dir / "bench" / "latency.json"
    latency = read_json(latency_path)
    bench = ((latency or {}).get("embedded", {}).get(task, {}) or {}).get(str(batch_size))
    splits = ("test",) if task == "retrieval" else ("dev", "test")
    rows = []
    for model in models:
        path = metrics_dir / "eval" / task / f"{model}.json"
        scores = read_json(path)
        row = {"model": label(model)}
        for split in splits:
            for metric in TASK_METRICS[task]:
                value = None if scores is None else scores.get(split, {}).get(metric)
                row[f"{split} {METRIC_LABELS.get(metric, metric)} (%)"] = _percent(value, decimals) or missing(path)
        if task != "retrieval":
            ms, cached = f"ms/example (batch {batch_size})", f"ms/example, images cached (batch {batch_size})"
            if not bench:
                row[ms] = row[cached] = missing(latency_path)
            elif model == "teacher":
                row[ms], row[cached] = f"{bench['teacher_ms']:.3f}", "n/a (fusion)"
            elif model in fusion_students:
                row[ms] = row[cached] = "not timed (fusion student)"
            else:
                row[ms], row[cached] = f"{bench['dual_ms']:.3f}", f"{bench['dual_cached_ms']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


RANKING = Path("eval/retrieval/ranking.meta.json")
"""How each retrieval model's recalls were ranked (written by evaluate@retrieval, under ``metrics_dir``)."""


def retrieval_ranking(metrics_dir: str | Path, models: list[str]) -> str:
    """The line under the retrieval table that says which ranking produced each model's recalls: the full ranking
    (every caption against every image) or a re-ranking of a dual encoder's top-k candidates per direction
    (``evaluate.rerank_k``), with the joint passes it took on test."""
    path = Path(metrics_dir) / RANKING
    info = read_json(path)
    if info is None:
        return f"Ranking: {missing(path)}"
    groups: dict[str, list[str]] = {}
    for model in models:
        entry = info.get(model)
        if entry is None:
            how = f"not recorded in {path}"
        elif entry["ranking"] == "full":
            how = "full ranking (every caption scored against every image)"
        else:
            k, dual = re.fullmatch(r"rerank@(\d+) by (\w+)", entry["ranking"]).groups()
            how = (f"re-ranked: the fusion model scores the top-{k} candidates of {label(dual)}'s similarities in each "
                   f"direction, the rest rank below ({entry['pairs_scored']['test']:,} of "
                   f"{entry['pairs_total']['test']:,} test pairs scored jointly)")
        groups.setdefault(how, []).append(label(model))
    return "Ranking: " + "; ".join(f"{', '.join(names)}: {how}" for how, names in groups.items()) + "."


def has_seed_replicas(models: list[str]) -> bool:
    """Whether any model is a seed replica ``<variant>_seed<k>`` (then :func:`seed_summary` has something to add)."""
    return any(SEED_SUFFIX.search(model) for model in models)


def seed_summary(metrics_dir: str | Path, task: str, models: list[str], decimals: int = 1) -> pd.DataFrame:
    """Mean ± sample std over seed replicas (``<variant>`` and ``<variant>_seed<k>``) of the task's first metric on
    dev and test; one row per variant with its number of seeds (std shown only with ≥ 2 seeds)."""
    groups: dict[str, list[str]] = {}
    for model in models:
        groups.setdefault(SEED_SUFFIX.sub("", model), []).append(model)
    metric = TASK_METRICS[task][0]
    rows = []
    for base, members in groups.items():
        row = {"model": label(base), "seeds": str(len(members))}
        for split in ("dev", "test"):
            values = [((read_json(Path(metrics_dir) / "eval" / task / f"{m}.json") or {}).get(split, {})).get(metric)
                      for m in members]
            found = pd.Series([100 * v for v in values if v is not None], dtype=float)
            name = f"{split} {METRIC_LABELS.get(metric, metric)} (%)"
            if len(found) < len(members):
                row[name] = missing(f"metrics/eval/{task}/ for {len(members) - len(found)} of {members}")
            elif len(found) > 1:
                row[name] = f"{found.mean():.{decimals}f} ± {found.std():.{decimals}f}"
            else:
                row[name] = f"{found.mean():.{decimals}f}"
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
    colours: dict[str, str] = {}  # seed replicas (<variant>_seed<k>) share their variant's colour, dashed
    for name, frame in frames.items():
        base = SEED_SUFFIX.sub("", name)
        style = {"color": colours.setdefault(base, f"C{len(colours) % 10}"), "linestyle": "--" if base != name else "-"}
        if f"dev_{metric}" in frame:
            dev = frame.dropna(subset=[f"dev_{metric}"])
            ax_dev.plot(dev["step"], 100 * dev[f"dev_{metric}"], marker="o", label=label(name), **style)
        train = frame.dropna(subset=["loss"])
        ax_loss.plot(train["step"], train["loss"], label=label(name), alpha=0.8, **style)
    ax_dev.set(xlabel="optimizer step", ylabel=f"dev {metric} (%)", title=f"{title}: dev {metric}")
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (weighted sum)", title=f"{title}: training loss",
                yscale="log")
    for ax in (ax_dev, ax_loss):
        ax.grid(alpha=0.3)
    handles, names = ax_loss.get_legend_handles_labels()  # one legend under both panels: it never hides a curve
    rows = -(-len(names) // 3)
    fig.legend(handles, names, loc="lower center", ncol=min(3, len(names)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    return save_figure(fig, out, dpi=110)


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


# ------------------------------------------------------------------------------------------ paper-style tables
CLASSIFICATION_TASKS = ("nlvr2", "snli_ve", "vqa")
"""The tasks of the paper's main table (retrieval has its own)."""


def _score(metrics_dir: Path, task: str, model: str, split: str, metric: str) -> tuple[float | None, Path]:
    path = metrics_dir / "eval" / task / f"{model}.json"
    scores = read_json(path)
    return (None if scores is None else scores.get(split, {}).get(metric)), path


NOT_RUN = "not in runs"


def paper_main_table(metrics_dir: str | Path, tasks: list[str], models: list[str], decimals: int = 1,
                     task_variants: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Table 1: rows = models, columns = dev and test of each classification task's metric (%), and the average of
    the test columns (only when every one of them is present). With ``task_variants`` (the students ``runs`` trains
    per task), a student not trained on a task shows :data:`NOT_RUN` there instead of a missing file."""
    metrics_dir = Path(metrics_dir)
    rows = []
    for model in models:
        row, tests = {"model": label(model)}, []
        for task in [t for t in CLASSIFICATION_TASKS if t in tasks]:
            metric = TASK_METRICS[task][0]
            trained = model == "teacher" or task_variants is None or model in task_variants.get(task, [])
            for split in ("dev", "test"):
                value, path = _score(metrics_dir, task, model, split, metric) if trained else (None, None)
                row[f"{task} {split}"] = _percent(value, decimals) or (missing(path) if trained else NOT_RUN)
                if split == "test":
                    tests.append(value)
        row["avg. test"] = (f"{100 * sum(tests) / len(tests):.{decimals}f}" if tests and None not in tests
                            else "n/a (not every task has a score)")
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def _seed_values(metrics_dir: Path, task: str, variant: str, seeds: list[int], split: str,
                 metric: str) -> tuple[list[float], list[int]]:
    """The metric (%) of each seed's model ``<variant>_seed<k>`` that has a metrics file, and the seeds that have none."""
    found, absent = [], []
    for seed in seeds:
        value, _ = _score(metrics_dir, task, f"{variant}_seed{seed}", split, metric)
        (found.append(100 * value) if value is not None else absent.append(seed))
    return found, absent


def mean_std(values: list[float], decimals: int) -> str:
    """``mean ± sample std`` (just the value for one seed)."""
    series = pd.Series(values, dtype=float)
    if len(series) > 1:
        return f"{series.mean():.{decimals}f} ± {series.std():.{decimals}f}"
    return f"{series.mean():.{decimals}f}"


def ablation_table(metrics_dir: str | Path, task: str, variants: list[str], seeds: list[int],
                   recipes: dict[str, dict], decimals: int = 1) -> pd.DataFrame:
    """Tables 4–7: one row per ablation variant with its recipe (``recipes[variant]``: knowledge, layers, stages,
    student) and the task's metric (%) on dev and test as mean ± std over the seeds' models ``<variant>_seed<k>``;
    a cell whose seeds are not all present says which are missing."""
    metrics_dir, metric = Path(metrics_dir), TASK_METRICS[task][0]
    rows = []
    for variant in variants:
        recipe = recipes.get(variant, {})
        row = {"variant": variant, "student": recipe.get("student", "?"), "knowledge": recipe.get("knowledge", "?"),
               "layers": recipe.get("layers", "?"), "stages": recipe.get("stages", "?"), "seeds": str(len(seeds))}
        for split in ("dev", "test"):
            found, absent = _seed_values(metrics_dir, task, variant, seeds, split, metric)
            name = f"{split} {METRIC_LABELS.get(metric, metric)} (%)"
            where = metrics_dir / "eval" / task / f"{variant}_seed{{{','.join(map(str, absent))}}}.json"
            row[name] = missing(where) if absent else mean_std(found, decimals)
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def latency_table(metrics_dir: str | Path, decimals: int = 2) -> pd.DataFrame:
    """Table 3: ms per example of the teacher, the dual encoder and the dual encoder with cached image
    representations, and the speed-ups over the teacher, per scale (embedded models / paper-size ViLT-B/32), task and
    batch size, from ``metrics/bench/latency.json``."""
    path = Path(metrics_dir) / "bench" / "latency.json"
    latency = read_json(path)
    if latency is None:
        return pd.DataFrame([{"scale": missing(path)}]).set_index("scale")
    rows = []
    for scale in ("embedded", "paper"):
        for task, sizes in (latency.get(scale) or {}).items():
            for size, r in sizes.items():
                rows.append({"scale": scale, "task": task, "batch": str(size),
                             "teacher ms": f"{r['teacher_ms']:.{decimals}f}", "dual ms": f"{r['dual_ms']:.{decimals}f}",
                             "dual, images cached ms": f"{r['dual_cached_ms']:.{decimals}f}",
                             "speed-up (dual)": f"{r['speedup_uncached']:.1f}×",
                             "speed-up (cached)": f"{r['speedup_cached']:.1f}×"})
    if not rows:
        return pd.DataFrame([{"scale": f"no scales in {path}"}]).set_index("scale")
    return pd.DataFrame(rows)


def retrieval_cost_table(metrics_dir: str | Path) -> pd.DataFrame:
    """Seconds to score N images × 5N captions (``metrics/bench/retrieval.json``): dual encoder vs fusion teacher,
    saying which numbers are extrapolated from a sample."""
    path = Path(metrics_dir) / "bench" / "retrieval.json"
    cost = read_json(path)
    if cost is None:
        return pd.DataFrame([{"scale": missing(path)}]).set_index("scale")
    rows = []
    for scale in ("embedded", "paper"):
        sizes = cost.get(scale) or {}
        for n, r in sorted(sizes.items(), key=lambda item: int(item[0]) if item[0].isdigit() else -1):
            if not isinstance(r, dict) or "dual_s" not in r:
                continue
            rows.append({"scale": scale, "N images": str(n), "captions": str(5 * int(n)),
                         "dual encoder s": f"{r['dual_s']:.3g}" + (" (extrapolated)" if r.get("dual_measured") ==
                                                                  "extrapolated" else ""),
                         "fusion teacher s": f"{r['teacher_s']:.3g}" + (
                             f" (extrapolated from {r['teacher_pairs_sampled']} pairs)"
                             if r.get("teacher_extrapolated") else ""),
                         "speed-up": f"{r['teacher_s'] / r['dual_s']:.0f}×"})
    if not rows:
        return pd.DataFrame([{"scale": f"no sizes in {path}"}]).set_index("scale")
    return pd.DataFrame(rows)


DEPLOY_GRAPHS = ("text", "image", "head")


def deploy_rows(bench: dict) -> list[tuple[str, str, str, dict]]:
    """``(scale, graph, batch, row)`` of ``deploy.json``'s ``towers``: text, image, head; batches in increasing order
    (the file's keys are sorted as strings)."""
    return [(scale, graph, size, graphs[graph][size]) for scale, graphs in bench["towers"].items()
            for graph in DEPLOY_GRAPHS if graph in graphs for size in sorted(graphs[graph], key=int)]


def deploy_tables(metrics_dir: str | Path, decimals: int = 3) -> dict[str, pd.DataFrame]:
    """The deployment benchmark (``metrics/bench/deploy.json``) as three tables: ``towers`` (ms per example, PyTorch
    eager vs onnxruntime, per scale, graph and batch), ``faiss`` (exact vs approximate search per gallery size) and
    ``query`` (one text query end to end against the teacher, extrapolated values marked *)."""
    path = Path(metrics_dir) / "bench" / "deploy.json"
    bench = read_json(path)
    if bench is None:
        gone = pd.DataFrame([{"table": missing(path)}]).set_index("table")
        return {"towers": gone, "faiss": gone, "query": gone}
    towers = [{"scale": scale, "graph": graph, "batch": size, "PyTorch ms": f"{r['torch_ms']:.{decimals}f}",
               "onnxruntime ms": f"{r['onnx_ms']:.{decimals}f}", "speed-up": f"{r['speedup']:.1f}×"}
              for scale, graph, size, r in deploy_rows(bench)]
    faiss = [{"gallery": f"{int(n):,}", "memory MB": f"{r['memory_mb']:.0f}",
              "exact build s": f"{r['exact']['build_s']:.2f}", "exact queries/s": f"{r['exact']['qps']:,.0f}",
              f"{r['approx']['kind']} build s": f"{r['approx']['build_s']:.2f}",
              f"{r['approx']['kind']} queries/s": f"{r['approx']['qps']:,.0f}",
              f"{r['approx']['kind']} recall@10": f"{r['approx']['recall_at_10']:.3f}"}
             for n, r in sorted(bench["faiss"].items(), key=lambda item: int(item[0]))]

    def shown(row: dict, key: str, fmt: str) -> str:
        return f"{row[key]:{fmt}}" + ("*" if key in row["extrapolated"] else "")

    query = [{"scale": scale, "gallery": f"{r['gallery']:,}", "tokenise ms": shown(r, "tokenise_ms", ".3f"),
              "text tower ms (PyTorch / ONNX)": f"{r['text_torch_ms']:.3f} / {r['text_onnx_ms']:.3f}",
              "exact search ms": shown(r, "search_exact_ms", ".2f"),
              "approx search ms": shown(r, "search_approx_ms", ".2f"),
              "dual query ms (exact / approx)": f"{r['dual_exact_ms']:.2f} / {r['dual_approx_ms']:.2f}",
              "teacher s": shown(r, "teacher_s", ",.0f"),
              "gain (exact / approx)": f"{r['gain_exact']:,.0f}× / {r['gain_approx']:,.0f}×"}
             for scale, r in bench["query"].items()]
    return {"towers": pd.DataFrame(towers), "faiss": pd.DataFrame(faiss), "query": pd.DataFrame(query)}
