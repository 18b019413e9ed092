"""Report builders: every cell comes from a metrics file of this run (or says which file is missing), a student's
cells are mean ± std [95% interval] over its seeds' files (scipy is the reference for the intervals), DiDE's findings
are computed from those files, and the documents and figures are written."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats

from vldistill.data.datasets import EncodedSplit
from vldistill.evaluate.predictions import answered, predictions
from vldistill.report import figures, findings, stats, tables
from vldistill.report.render import Document


SEEDS = [0, 1, 2]
SCORES = {  # test accuracy (%) per seed; dev = test + 1
    "dide": [80.0, 82.0, 84.0], "dual_gt": [60.0, 62.0, 61.0], "soft": [70.0, 74.0, 78.0],
    "soft_attn_cross": [85.0, 86.0, 87.0], "soft_attn_all": [84.0, 85.0, 86.0], "soft_hidden": [75.0, 76.0, 77.0],
    "soft_attn_uni": [71.0, 72.0, 73.0], "layerwise": [84.0, 86.0, 88.0], "finetune_only": [83.0, 86.0, 89.0]}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _scores(metric: str, test: float) -> dict:
    return {"dev": {metric: (test + 1) / 100}, "test": {metric: test / 100}}


@pytest.fixture
def metrics(tmp_path) -> Path:
    """teacher.json (one run) and one ``<variant>_seed<k>.json`` per seed of the students on every task; the ablation
    rows on nlvr2 only."""
    root = tmp_path / "metrics"
    for shift, (task, metric) in enumerate((("nlvr2", "accuracy"), ("snli_ve", "accuracy"), ("vqa", "vqa_score"))):
        _write(root / "eval" / task / "teacher.json", _scores(metric, 90.0 - shift))
        for variant, values in SCORES.items():
            if task == "nlvr2" or variant in ("dide", "dual_gt"):
                for seed, value in zip(SEEDS, values):
                    _write(root / "eval" / task / f"{variant}_seed{seed}.json", _scores(metric, value - shift))
    row = {"teacher_ms": 10.0, "dual_ms": 8.0, "dual_cached_ms": 0.5, "speedup_uncached": 1.25, "speedup_cached": 20.0}
    _write(root / "bench/latency.json", {"embedded": {"vqa": {"1": row}}, "paper": {"vqa": {"1": row, "32": row}}})
    _write(root / "bench/retrieval.json", {
        "embedded": {"100": {"dual_s": 0.1, "dual_measured": "end_to_end", "teacher_s": 5.0,
                             "teacher_extrapolated": True, "teacher_pairs_sampled": 256}},
        "paper": {"100": {"dual_s": 2.0, "dual_measured": "extrapolated", "teacher_s": 900.0,
                          "teacher_extrapolated": True, "teacher_pairs_sampled": 64}},
        "setup": {"units": {"dual_s": "seconds"}}, "device": {"kind": "cpu"}})
    return root


def _cell(values: list[float]) -> str:
    """mean ± sample std [95% t interval of the mean], computed here with scipy as the reference."""
    mean, std = statistics.mean(values), statistics.stdev(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=std / len(values) ** 0.5)
    return f"{mean:.1f} ± {std:.1f} [{low:.1f}, {high:.1f}]"


def test_summary_and_welch_intervals_match_scipy():
    a, b = [80.0, 82.0, 84.0, 79.0], [60.0, 62.0, 61.0]
    summary = stats.summarize(a)
    low, high = scipy_stats.t.interval(0.95, 3, loc=statistics.mean(a), scale=scipy_stats.sem(a))
    assert summary.interval == pytest.approx((low, high)) and summary.std == pytest.approx(statistics.stdev(a))
    reference = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    difference = stats.welch(stats.summarize(a), summary_b := stats.summarize(b))
    assert difference.value == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert difference.interval == pytest.approx((reference.low, reference.high))
    assert stats.verdict(difference.interval) == stats.HOLDS
    assert stats.verdict(stats.welch(summary_b, stats.summarize(a)).interval) == stats.FAILS
    assert stats.verdict(stats.welch(stats.summarize([1.0, 3.0]), stats.summarize([2.0, 2.5])).interval) == \
        stats.INCONCLUSIVE
    one = stats.summarize([70.0])
    assert one.std is None and one.interval is None and stats.welch(one, summary_b).interval is None
    assert stats.format_summary(one, 1) == "70.0 (1 seed: no interval)"
    assert stats.combine([stats.HOLDS, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
    assert stats.combine([stats.HOLDS, stats.FAILS]) == stats.FAILS and stats.combine([]) == stats.INCONCLUSIVE


def test_main_table_reads_every_seed_and_averages_test_per_seed(metrics):
    frame = tables.paper_main_table(metrics, ["nlvr2", "snli_ve", "vqa", "retrieval"], ["teacher", "dide"], SEEDS)
    assert list(frame.columns) == ["nlvr2 dev", "nlvr2 test", "snli_ve dev", "snli_ve test", "vqa dev", "vqa test",
                                   "avg. test"]
    teacher, dide = frame.loc[tables.label("teacher")], frame.loc[tables.label("dide")]
    assert teacher["nlvr2 test"] == "90.0" and teacher["avg. test"] == "89.0"  # one run: its value, no interval
    assert dide["nlvr2 dev"] == _cell([81.0, 83.0, 85.0]) and dide["vqa test"] == _cell([78.0, 80.0, 82.0])
    assert dide["avg. test"] == _cell([79.0, 81.0, 83.0])  # per seed the mean over tasks, then over seeds


def test_main_table_says_missing_and_does_not_average_a_gap(metrics):
    (metrics / "eval/snli_ve/dide_seed1.json").unlink()
    frame = tables.paper_main_table(metrics, ["nlvr2", "snli_ve", "vqa"], ["dide"], SEEDS)
    row = frame.loc[tables.label("dide")]
    assert row["snli_ve test"] == f"missing: {metrics / 'eval/snli_ve/dide_seed1.json'}"
    assert row["avg. test"].startswith("n/a")
    runs = {"nlvr2": ["dide"], "snli_ve": [], "vqa": ["dide"]}
    row = tables.paper_main_table(metrics, ["nlvr2", "snli_ve", "vqa"], ["teacher", "dide"], SEEDS,
                                  task_variants=runs).loc[tables.label("dide")]
    assert row["snli_ve test"] == tables.NOT_RUN and row["nlvr2 test"] == _cell([80.0, 82.0, 84.0])


def test_main_students_leave_out_rows_trained_for_the_ablation_tables_only():
    runs = {"nlvr2": ["dide", "dual_gt", "soft", "fusion_gt"], "snli_ve": ["dide", "dual_gt", "fusion_gt"]}
    assert tables.main_students(runs, "nlvr2", {"knowledge": ["dual_gt", "soft"]}) == ["dide", "dual_gt",
                                                                                       "fusion_gt"]


def test_ablation_cells_are_mean_std_and_interval_over_seeds(metrics):
    recipes = {"soft": {"student": "dual", "knowledge": "soft", "layers": "last", "stages": "pretrain+finetune"}}
    (metrics / "eval/nlvr2/dual_gt_seed1.json").unlink()
    (metrics / "eval/nlvr2/dual_gt_seed2.json").unlink()
    frame = tables.ablation_table(metrics, "nlvr2", ["soft", "dual_gt"], SEEDS, recipes)
    assert frame.loc["soft", "dev acc. (%)"] == _cell([71.0, 75.0, 79.0])
    assert frame.loc["soft", "knowledge"] == "soft" and frame.loc["soft", "seeds"] == "3"
    assert frame.loc["dual_gt", "test acc. (%)"] == f"missing: {metrics / 'eval/nlvr2/dual_gt_seed{1,2}.json'}"


RECIPES = {
    "dual_gt": {"knowledge": "gt", "layers": "last", "stages": "pretrain+finetune"},
    "soft": {"knowledge": "soft", "layers": "last", "stages": "pretrain+finetune"},
    "soft_hidden": {"knowledge": "soft+hidden", "layers": "last", "stages": "pretrain+finetune"},
    "soft_attn_all": {"knowledge": "soft+attn_all", "layers": "last", "stages": "pretrain+finetune"},
    "soft_attn_cross": {"knowledge": "soft+attn_cross", "layers": "last", "stages": "pretrain+finetune"},
    "soft_attn_uni": {"knowledge": "soft+attn_uni", "layers": "last", "stages": "pretrain+finetune"},
    "layerwise": {"knowledge": "soft+attn_cross", "layers": "layerwise", "stages": "pretrain+finetune"},
    "finetune_only": {"knowledge": "soft+attn_cross", "layers": "last", "stages": "finetune"}}
TABLES = {"knowledge": ["dual_gt", "soft", "soft_hidden", "soft_attn_all", "soft_attn_cross", "soft_attn_uni"],
          "layers": ["soft_attn_cross", "layerwise"], "stages": ["finetune_only", "soft_attn_cross"]}
TASK_RUNS = {"nlvr2": list(SCORES), "snli_ve": ["dide", "dual_gt"], "vqa": ["dide", "dual_gt"]}
METRICS = {"nlvr2": "accuracy", "snli_ve": "accuracy", "vqa": "vqa_score"}


def _findings(metrics, tables_=TABLES):
    return {f.key: f for f in findings.dide_findings(metrics, SEEDS, METRICS, ["nlvr2", "snli_ve", "vqa"], TASK_RUNS,
                                                     "nlvr2", tables_, RECIPES)}


def test_findings_are_computed_from_the_seeds_and_chosen_on_dev(metrics):
    found = _findings(metrics)
    assert [c.task for c in found["1"].comparisons] == ["nlvr2", "snli_ve", "vqa"]
    first = found["1"].comparisons[0]
    reference = scipy_stats.ttest_ind(SCORES["dide"], SCORES["dual_gt"], equal_var=False).confidence_interval()
    assert first.difference.value == pytest.approx(21.0)
    assert first.difference.interval == pytest.approx((reference.low, reference.high))
    assert found["1"].verdict == stats.HOLDS
    # attention (soft_attn_cross: best dev of the three attention rows) > hidden > soft > gt
    ranked = found["2"].comparisons
    assert "soft_attn_cross" in ranked[0].name and ranked[0].difference.value == pytest.approx(10.0)
    assert ranked[1].difference.value == pytest.approx(2.0) and ranked[1].verdict == stats.INCONCLUSIVE
    assert ranked[2].difference.value == pytest.approx(74.0 - 61.0) and found["2"].verdict == stats.INCONCLUSIVE
    cross_uni, cross_all = found["3"].comparisons
    assert cross_uni.verdict == stats.HOLDS and cross_all.at_least and cross_all.verdict == stats.INCONCLUSIVE
    assert found["3"].verdict == stats.INCONCLUSIVE  # +1.0, interval ±2.3 over 3 seeds each
    assert found["4"].comparisons[0].difference.value == pytest.approx(0.0)
    assert found["4"].comparisons[0].verdict == stats.INCONCLUSIVE  # ≥ and consistent with equal: not against it
    assert found["5"].comparisons[0].difference.value == pytest.approx(0.0)
    table = findings.findings_table(list(found.values()))
    assert list(table["verdict"])[:3] == [stats.HOLDS] * 3
    assert "(consistent with equal)" in table.loc[table["finding"] == "4", "verdict"].item()
    assert findings.finding_line(found["1"]).startswith("**1. ") and "3 of 3 comparisons hold" in \
        findings.finding_line(found["1"])


def test_a_finding_that_fails_or_lacks_rows_says_so(metrics):
    for seed, value in zip(SEEDS, (50.0, 51.0, 52.0)):  # DiDE below dual-GT on vqa
        _write(metrics / f"eval/vqa/dide_seed{seed}.json", _scores("vqa_score", value))
    (metrics / "eval/snli_ve/dual_gt_seed2.json").unlink()
    found = _findings(metrics, {"knowledge": ["dual_gt", "soft"]})
    nlvr2, snli_ve, vqa = found["1"].comparisons
    assert nlvr2.verdict == stats.HOLDS and vqa.verdict == stats.FAILS and found["1"].verdict == stats.FAILS
    assert snli_ve.verdict == findings.MISSING and "dual_gt_seed2.json" in snli_ve.missing
    assert found["2"].comparisons[0].verdict == findings.MISSING  # no attention row in the knowledge table
    assert found["4"].verdict == findings.MISSING and found["5"].verdict == findings.MISSING


def test_figures_and_documents_are_written(metrics, tmp_path):
    out = tmp_path / "reports"
    bars = figures.plot_latency(json.loads((metrics / "bench/latency.json").read_text()), out / "figures/latency.png")
    cost = figures.plot_retrieval_cost(json.loads((metrics / "bench/retrieval.json").read_text()),
                                       out / "figures/cost.png")
    headline = figures.plot_headline(metrics, ["nlvr2", "snli_ve", "vqa"], METRICS, SEEDS,
                                     out / "figures/headline.png")
    plots = tmp_path / "plots/train/distill_finetune/nlvr2/soft"
    plots.mkdir(parents=True)
    for seed in (0, 1):
        pd.DataFrame({"step": [10, 20], "loss": [1.0, 0.5], "dev_accuracy": [0.6, 0.7 + seed / 100]}).to_csv(
            plots / f"seed{seed}.csv", index=False)
    curves = figures.plot_ablation_curves(tmp_path / "plots", "nlvr2", ["soft", "gt"], [0, 1], "accuracy",
                                          out / "figures/abl.png", "knowledge")
    assert figures.plot_ablation_curves(tmp_path / "plots", "nlvr2", ["gt"], [0], "accuracy", out / "x.png", "t") is None
    ends = tables.curve_ends(tmp_path / "plots", "nlvr2", ["soft"], [0, 1], "accuracy")
    assert ends.loc[tables.label("soft"), "best dev at step"] == "20, 20 of 20"
    assert ends.loc[tables.label("soft"), "seeds with a curve"] == "2 of 2"
    for png in (bars, cost, curves, headline):
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5_000
    doc = Document(out)
    doc.heading(2, "Table")
    doc.text("`code` and *emphasis*")
    doc.table(tables.latency_table(metrics))
    doc.figure(bars, "latency bars")
    doc.write(out / "results.md", out / "results.html")
    doc.write_index(out / "README.md", {"results": out / "results.md"})
    md, page = (out / "results.md").read_text(), (out / "results.html").read_text()
    assert "![latency bars](figures/latency.png)" in md and "| scale" in md
    assert '<img src="figures/latency.png"' in page and "<code>code</code>" in page and "<table" in page
    assert "[latency bars](figures/latency.png)" in (out / "README.md").read_text()


class _FixedModel(torch.nn.Module):
    """Logits that favour class ``row % C``: predictions are known in advance."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def classify(self, input_ids, attention_mask, pixel_values):
        rows = input_ids[:, 0]
        return torch.nn.functional.one_hot(rows % self.classes, self.classes).float()


def _split(n: int, answers: int, answered: bool) -> EncodedSplit:
    ids = torch.arange(n)[:, None].repeat(1, 4)
    targets = torch.zeros(n, answers)
    if answered:
        targets[:, 0] = 1.0
    return EncodedSplit(columns={"input_ids": ids, "attention_mask": torch.ones(n, 4, dtype=torch.long),
                                 "image": torch.zeros(n, dtype=torch.long), "targets": targets},
                        images=torch.zeros(1, 8, 8, 3, dtype=torch.uint8), pixel_norm="unit",
                        texts=[f"q{i}" for i in range(n)])


def test_vqa_predictions_are_the_submission_format_and_unanswered_splits_are_recognised():
    split = _split(5, 3, answered=False)
    records = predictions(_FixedModel(3), split, "vqa", question_ids=[10, 11, 12, 13, 14], answers=["yes", "no", "2"])
    assert records == [{"question_id": 10 + i, "answer": ["yes", "no", "2"][i % 3]} for i in range(5)]
    assert not answered(split) and answered(_split(5, 3, answered=True))
    with pytest.raises(ValueError, match="question_ids"):
        predictions(_FixedModel(3), split, "vqa")
    assert predictions(_FixedModel(3), split, "snli_ve")[4] == {"example": 4, "label": 1}
