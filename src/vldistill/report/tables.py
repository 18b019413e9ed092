"""Table and figure builders for the report notebooks. Every number is read from this run's metrics files; a missing
file makes its cells say so instead of showing a stale or typed value. A student is trained once per seed of
``seeds`` (models ``<variant>_seed<k>``): its cells are mean ± sample std [95% t interval of the mean] over them
(:mod:`vldistill.report.stats`); the teacher is one run, shown as its value."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from vldistill import paths
from vldistill.io import save_figure
from vldistill.report.stats import Summary, format_summary, summarize

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


def label(model: str) -> str:
    """Readable name of a model; seed replicas (``<variant>_seed<k>``) say which seed they are."""
    base = SEED_SUFFIX.sub("", model)
    seed = model[len(base) + len("_seed"):] if base != model else None
    return MODEL_LABELS.get(base, base) + (f" (seed {seed})" if seed else "")


TEACHER = "teacher"
"""The one model that is not trained once per seed (a single run: no std, no interval)."""


def _under(root: str | Path, path: Path) -> Path:
    """A :mod:`vldistill.paths` path (``metrics/...``, ``plots/...``) under another root folder (a test's tmp dir)."""
    return Path(root) / Path(*path.parts[1:])


def model_files(metrics_dir: str | Path, task: str, model: str, seeds: list[int]) -> dict[int | None, Path]:
    """``{seed: metrics file}`` of one model on one task: the teacher's single run (seed ``None``), or each seed's
    replica ``<model>_seed<k>`` of a ``runs`` variant."""
    if model == TEACHER:
        return {None: _under(metrics_dir, paths.eval_metrics(task, model))}
    return {seed: _under(metrics_dir, paths.eval_metrics(task, paths.replica_name(model, seed))) for seed in seeds}


def seed_scores(metrics_dir: str | Path, task: str, model: str, seeds: list[int], split: str,
                metric: str) -> tuple[Summary | None, str | None]:
    """``(summary, None)`` of the model's ``metric`` (%) on ``split``, one value per seed in the order of ``seeds``
    (the teacher: its one run), or ``(None, "missing: ...")`` naming the files that lack it when any does."""
    files, values, absent = model_files(metrics_dir, task, model, seeds), [], []
    for seed, path in files.items():
        value = ((read_json(path) or {}).get(split) or {}).get(metric)
        if value is None:
            absent.append(seed)
        else:
            values.append(100 * value)
    if not absent:
        return summarize(values), None
    if model == TEACHER:
        return None, missing(files[None])
    seeds_shown = str(absent[0]) if len(absent) == 1 else "{" + ",".join(map(str, absent)) + "}"
    return None, missing(_under(metrics_dir, paths.eval_metrics(task, paths.replica_name(model, seeds_shown))))


def score_cell(summary: Summary | None, absent: str | None, model: str, decimals: int) -> str:
    """A table cell: the teacher's one value, a student's ``mean ± std [95% interval]``, or what is missing."""
    if absent:
        return absent
    return f"{summary.mean:.{decimals}f}" if model == TEACHER else format_summary(summary, decimals)


MAIN, BASELINE = "dide", "dual_gt"
"""The main recipe and the same dual encoder trained on ground truth only (``variants`` of params.yaml): rows of
table 1 wherever they are trained, and the two sides of DiDE's first finding."""


def main_students(task_variants: dict[str, list[str]], ablation_task: str,
                  ablation_tables: dict[str, list[str]]) -> list[str]:
    """The students of table 1: every variant ``runs`` trains except those that exist only for the ablation tables
    (trained on ``ablation_task`` alone and listed in one of ``ablation_tables``; :data:`MAIN` and :data:`BASELINE`
    are never left out), in the order of ``runs`` with the ablation task's runs last (they are mostly ablation
    rows)."""
    ablation_only = {v for variants in ablation_tables.values() for v in variants
                     if v not in (MAIN, BASELINE)
                     and all(v not in vs for task, vs in task_variants.items() if task != ablation_task)}
    students = []
    for task in sorted(task_variants, key=lambda t: t == ablation_task):
        students += [v for v in task_variants[task] if v not in students and v not in ablation_only]
    return students


def main_results(metrics_dir: str | Path, task: str, models: list[str], seeds: list[int], decimals: int = 1,
                 batch_size: int = 1, fusion_students: frozenset[str] = frozenset()) -> pd.DataFrame:
    """Rows: models; columns: the task's metrics (%) on dev and test (retrieval: test only), students as mean ± std
    [95% interval] over ``seeds``, and ms per example (uncached and with cached images) where the task is timed.

    Latency comes from ``metrics/bench/latency.json`` (teacher, and the DiDE student's architecture, shared by every
    dual-encoder variant; fusion students are not timed there)."""
    metrics_dir = Path(metrics_dir)
    latency_path = metrics_dir / "bench" / "latency.json"
    latency = read_json(latency_path)
    bench = ((latency or {}).get("embedded", {}).get(task, {}) or {}).get(str(batch_size))
    splits = ("test",) if task == "retrieval" else ("dev", "test")
    rows = []
    for model in models:
        row = {"model": label(model)}
        for split in splits:
            for metric in TASK_METRICS[task]:
                row[f"{split} {METRIC_LABELS.get(metric, metric)} (%)"] = score_cell(
                    *seed_scores(metrics_dir, task, model, seeds, split, metric), model, decimals)
        if task != "retrieval":
            ms, cached = f"ms/example (batch {batch_size})", f"ms/example, images cached (batch {batch_size})"
            if not bench:
                row[ms] = row[cached] = missing(latency_path)
            elif model == TEACHER:
                row[ms], row[cached] = f"{bench['teacher_ms']:.3f}", "n/a (fusion)"
            elif model in fusion_students:
                row[ms] = row[cached] = "not timed (fusion student)"
            else:
                row[ms], row[cached] = f"{bench['dual_ms']:.3f}", f"{bench['dual_cached_ms']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


RANKING = Path("eval/retrieval/ranking.meta.json")
"""How each retrieval model's recalls were ranked (written by evaluate@retrieval, under ``metrics_dir``)."""


def _ranking_text(entry: dict | None, path: Path) -> str:
    if entry is None:
        return f"not recorded in {path}"
    if entry["ranking"] == "full":
        return "full ranking (every caption scored against every image)"
    k, dual = re.fullmatch(r"rerank@(\d+) by (\w+)", entry["ranking"]).groups()
    return (f"re-ranked: the fusion model scores the top-{k} candidates of {label(dual)}'s similarities in each "
            f"direction, the rest rank below ({entry['pairs_scored']['test']:,} of {entry['pairs_total']['test']:,} "
            "test pairs scored jointly)")


def retrieval_ranking(metrics_dir: str | Path, models: list[str], seeds: list[int]) -> str:
    """The line under the retrieval table that says which ranking produced each model's recalls: the full ranking
    (every caption against every image) or a re-ranking of a dual encoder's top-k candidates per direction
    (``evaluate.rerank_k``), with the joint passes it took on test; a student's replicas are named once when they
    were all ranked alike."""
    path = Path(metrics_dir) / RANKING
    info = read_json(path)
    if info is None:
        return f"Ranking: {missing(path)}"
    groups: dict[str, list[str]] = {}
    for model in models:
        names = [TEACHER] if model == TEACHER else [paths.replica_name(model, seed) for seed in seeds]
        hows = {name: _ranking_text(info.get(name), path) for name in names}
        if len(set(hows.values())) == 1:
            groups.setdefault(next(iter(hows.values())), []).append(label(model))
        else:
            for name, how in hows.items():
                groups.setdefault(how, []).append(label(name))
    return "Ranking: " + "; ".join(f"{', '.join(names)}: {how}" for how, names in groups.items()) + "."


def replica_curves(plots_dir: str | Path, task: str, variant: str, seeds: list[int], column: str) -> pd.DataFrame:
    """One column of each seed's training curve (``plots/train/distill_finetune/<task>/<variant>/seed<k>.csv``),
    rows where it is logged: index = optimizer step, one column per seed that has a curve with it."""
    series = {}
    for seed in seeds:
        path = _under(plots_dir, paths.replica_curve(task, variant, seed))
        if path.is_file():
            frame = pd.read_csv(path)
            if column in frame:
                series[seed] = frame.dropna(subset=[column]).set_index("step")[column]
    return pd.DataFrame(series)


def curves(plots_dir: str | Path, task: str, variants: list[str], seeds: list[int]) -> dict[str, pd.DataFrame]:
    """Training curves ``{name: frame}`` of the task's teacher fine-tuning and of each seed's replica
    (``<variant>_seed<k>``) of each student variant, those present."""
    found = {TEACHER: Path(plots_dir) / "train" / "teacher_finetune" / f"{task}.csv"}
    found |= {paths.replica_name(v, k): _under(plots_dir, paths.replica_curve(task, v, k)) for v in variants
              for k in seeds}
    return {name: pd.read_csv(path) for name, path in found.items() if path.is_file()}


def plot_seed_band(ax, frames: list[pd.Series], **style) -> None:
    """Mean over seeds against step, and the min–max band where there are several seeds."""
    joined = pd.concat(frames, axis=1)
    line = ax.plot(joined.index, joined.mean(axis=1), **style)
    if len(frames) > 1:
        ax.fill_between(joined.index, joined.min(axis=1), joined.max(axis=1), color=line[0].get_color(), alpha=0.15)


def plot_curves(frames: dict[str, pd.DataFrame], metric: str, out: str | Path, title: str) -> Path:
    """Dev ``metric`` (left) and training loss (right) against optimizer step, one line per model: the seed
    replicas of a variant (``<variant>_seed<k>``) as their mean, with a min–max band; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[pd.DataFrame]] = {}
    for name, frame in frames.items():
        groups.setdefault(SEED_SUFFIX.sub("", name), []).append(frame)
    fig, (ax_dev, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (base, group) in enumerate(groups.items()):
        name = label(base) + (f" (mean of {len(group)} seeds, band min–max)" if len(group) > 1 else "")
        style = {"color": f"C{i % 10}", "label": name}
        dev = [f.dropna(subset=[f"dev_{metric}"]).set_index("step")[f"dev_{metric}"] * 100 for f in group
               if f"dev_{metric}" in f]
        if dev:
            plot_seed_band(ax_dev, dev, marker="o", **style)
        losses = [f.dropna(subset=["loss"]).set_index("step")["loss"] for f in group]
        plot_seed_band(ax_loss, losses, alpha=0.8, **style)
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


def curve_ends(plots_dir: str | Path, task: str, variants: list[str], seeds: list[int], metric: str,
               decimals: int = 1) -> pd.DataFrame:
    """Where each student's dev curve ends, over its seeds: the dev ``metric`` (%) at the last evaluation, its change
    since the evaluation before (points; > 0 while the curve still climbs), and the step of each seed's best dev
    evaluation (the checkpoint kept) against the last step."""
    rows = []
    for variant in variants:
        dev = replica_curves(plots_dir, task, variant, seeds, f"dev_{metric}") * 100
        row = {"model": label(variant), "seeds with a curve": f"{dev.shape[1]} of {len(seeds)}"}
        name = f"dev {METRIC_LABELS.get(metric, metric)} at the last evaluation (%)"
        if dev.shape[1] == 0 or len(dev.dropna()) < 2:
            row[name] = row["change since the evaluation before (points)"] = "no curve with two dev evaluations"
            row["best dev at step"] = "n/a"
        else:
            dev = dev.dropna()  # evaluation steps that every seed's curve reached
            row[name] = format_summary(summarize(dev.iloc[-1]), decimals)
            row["change since the evaluation before (points)"] = format_summary(
                summarize(dev.iloc[-1] - dev.iloc[-2]), decimals)
            row["best dev at step"] = f"{', '.join(str(int(dev[s].idxmax())) for s in dev)} of {int(dev.index[-1])}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


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

NOT_RUN = "not in runs"


def paper_main_table(metrics_dir: str | Path, tasks: list[str], models: list[str], seeds: list[int],
                     decimals: int = 1, task_variants: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Table 1: rows = models, columns = dev and test of each classification task's metric (%), students as mean ±
    std [95% interval] over ``seeds``, and the average of the test columns (only when every one of them is present;
    a student's average is taken per seed over the tasks, then summarised over the seeds). With ``task_variants``
    (the students ``runs`` trains per task), a student not trained on a task shows :data:`NOT_RUN` there instead of
    a missing file."""
    rows = []
    for model in models:
        row, tests = {"model": label(model)}, []
        for task in [t for t in CLASSIFICATION_TASKS if t in tasks]:
            metric = TASK_METRICS[task][0]
            trained = model == TEACHER or task_variants is None or model in task_variants.get(task, [])
            for split in ("dev", "test"):
                if not trained:
                    row[f"{task} {split}"] = NOT_RUN
                    tests += [None] if split == "test" else []
                    continue
                summary, absent = seed_scores(metrics_dir, task, model, seeds, split, metric)
                row[f"{task} {split}"] = score_cell(summary, absent, model, decimals)
                tests += [summary] if split == "test" else []
        if tests and None not in tests:
            per_seed = [sum(values) / len(values) for values in zip(*(s.values for s in tests))]
            row["avg. test"] = score_cell(summarize(per_seed), None, model, decimals)
        else:
            row["avg. test"] = "n/a (not every task has a score)"
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def ablation_table(metrics_dir: str | Path, task: str, variants: list[str], seeds: list[int],
                   recipes: dict[str, dict], decimals: int = 1) -> pd.DataFrame:
    """Tables 4–7: one row per ablation variant with its recipe (``recipes[variant]``: knowledge, layers, stages,
    student) and the task's metric (%) on dev and test as mean ± std [95% interval] over the seeds' models
    ``<variant>_seed<k>``; a cell whose seeds are not all present says which are missing."""
    metric = TASK_METRICS[task][0]
    rows = []
    for variant in variants:
        recipe = recipes.get(variant, {})
        row = {"variant": variant, "student": recipe.get("student", "?"), "knowledge": recipe.get("knowledge", "?"),
               "layers": recipe.get("layers", "?"), "stages": recipe.get("stages", "?"), "seeds": str(len(seeds))}
        for split in ("dev", "test"):
            row[f"{split} {METRIC_LABELS.get(metric, metric)} (%)"] = score_cell(
                *seed_scores(metrics_dir, task, variant, seeds, split, metric), variant, decimals)
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
