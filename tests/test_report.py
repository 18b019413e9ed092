"""Report builders: every cell comes from a metrics file of this run (or says which file is missing), ablation cells
are mean ± std over the seeds' files, and the documents and figures are written."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch

from vldistill.data.datasets import EncodedSplit
from vldistill.evaluate.predictions import answered, predictions
from vldistill.report import figures, tables
from vldistill.report.render import Document


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def metrics(tmp_path) -> Path:
    root = tmp_path / "metrics"
    for task, metric in (("nlvr2", "accuracy"), ("snli_ve", "accuracy"), ("vqa", "vqa_score")):
        for i, model in enumerate(("teacher", "dual_gt", "dide")):
            _write(root / "eval" / task / f"{model}.json", {"dev": {metric: 0.5 + 0.1 * i}, "test": {metric: 0.4 + 0.1 * i}})
    for seed, acc in zip((0, 1, 2), (0.70, 0.74, 0.78)):
        _write(root / "eval/nlvr2" / f"soft_seed{seed}.json", {"dev": {"accuracy": acc}, "test": {"accuracy": acc - 0.01}})
    _write(root / "eval/nlvr2/gt_seed0.json", {"dev": {"accuracy": 0.6}, "test": {"accuracy": 0.6}})
    row = {"teacher_ms": 10.0, "dual_ms": 8.0, "dual_cached_ms": 0.5, "speedup_uncached": 1.25, "speedup_cached": 20.0}
    _write(root / "bench/latency.json", {"embedded": {"vqa": {"1": row}}, "paper": {"vqa": {"1": row, "32": row}}})
    _write(root / "bench/retrieval.json", {
        "embedded": {"100": {"dual_s": 0.1, "dual_measured": "end_to_end", "teacher_s": 5.0,
                             "teacher_extrapolated": True, "teacher_pairs_sampled": 256}},
        "paper": {"100": {"dual_s": 2.0, "dual_measured": "extrapolated", "teacher_s": 900.0,
                          "teacher_extrapolated": True, "teacher_pairs_sampled": 64}},
        "setup": {"units": {"dual_s": "seconds"}}, "device": {"kind": "cpu"}})
    return root


def test_main_table_reads_every_cell_and_averages_test(metrics):
    frame = tables.paper_main_table(metrics, ["nlvr2", "snli_ve", "vqa", "retrieval"], ["teacher", "dide"])
    assert list(frame.columns) == ["nlvr2 dev", "nlvr2 test", "snli_ve dev", "snli_ve test", "vqa dev", "vqa test",
                                   "avg. test"]
    dide = frame.loc[tables.label("dide")]
    assert dide["nlvr2 dev"] == "70.0" and dide["vqa test"] == "60.0" and dide["avg. test"] == "60.0"


def test_main_table_says_missing_and_does_not_average_a_gap(metrics):
    (metrics / "eval/snli_ve/dide.json").unlink()
    frame = tables.paper_main_table(metrics, ["nlvr2", "snli_ve", "vqa"], ["dide"])
    row = frame.loc[tables.label("dide")]
    assert row["snli_ve test"] == f"missing: {metrics / 'eval/snli_ve/dide.json'}"
    assert row["avg. test"].startswith("n/a")
    runs = {"nlvr2": ["dide"], "snli_ve": [], "vqa": ["dide"]}
    row = tables.paper_main_table(metrics, ["nlvr2", "snli_ve", "vqa"], ["teacher", "dide"], task_variants=runs).loc[
        tables.label("dide")]
    assert row["snli_ve test"] == tables.NOT_RUN and row["nlvr2 test"] == "60.0"


def test_ablation_cells_are_mean_and_sample_std_over_seeds(metrics):
    recipes = {"soft": {"student": "dual", "knowledge": "soft", "layers": "last", "stages": "pretrain+finetune"}}
    frame = tables.ablation_table(metrics, "nlvr2", ["soft", "gt"], [0, 1, 2], recipes)
    values = [70.0, 74.0, 78.0]
    assert frame.loc["soft", "dev acc. (%)"] == f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    assert frame.loc["soft", "knowledge"] == "soft" and frame.loc["soft", "seeds"] == "3"
    assert frame.loc["gt", "test acc. (%)"] == f"missing: {metrics / 'eval/nlvr2/gt_seed{1,2}.json'}"


def test_latency_and_retrieval_cost_tables(metrics):
    latency = tables.latency_table(metrics)
    assert len(latency) == 3 and set(latency["scale"]) == {"embedded", "paper"}
    assert (latency["speed-up (cached)"] == "20.0×").all()
    cost = tables.retrieval_cost_table(metrics)
    paper = cost[cost["scale"] == "paper"].iloc[0]
    assert paper["speed-up"] == "450×" and "extrapolated" in paper["dual encoder s"]
    assert "from 64 pairs" in paper["fusion teacher s"] and paper["captions"] == "500"
    (metrics / "bench/latency.json").unlink()
    assert tables.latency_table(metrics).index[0].startswith("missing: ")


def test_figures_and_documents_are_written(metrics, tmp_path):
    out = tmp_path / "reports"
    bars = figures.plot_latency(json.loads((metrics / "bench/latency.json").read_text()), out / "figures/latency.png")
    cost = figures.plot_retrieval_cost(json.loads((metrics / "bench/retrieval.json").read_text()),
                                       out / "figures/cost.png")
    plots = tmp_path / "plots/train/distill_finetune/nlvr2"
    plots.mkdir(parents=True)
    for seed in (0, 1):
        pd.DataFrame({"step": [10, 20], "loss": [1.0, 0.5], "dev_accuracy": [0.6, 0.7 + seed / 100]}).to_csv(
            plots / f"soft_seed{seed}.csv", index=False)
    curves = figures.plot_ablation_curves(tmp_path / "plots", "nlvr2", ["soft", "gt"], [0, 1], "accuracy",
                                          out / "figures/abl.png", "knowledge")
    assert figures.plot_ablation_curves(tmp_path / "plots", "nlvr2", ["gt"], [0], "accuracy", out / "x.png", "t") is None
    for png in (bars, cost, curves):
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
