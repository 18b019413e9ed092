"""End to end, as a user would: `dvc repro` on a tiny params override in a fresh copy of the repository, then a
no-op rerun, the README's knob changing only the distillation stages' params, a one-knob experiment that reruns only
the stages downstream of it, and a bad knob that fails fast."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_RUNS, TINY_SEEDS, tiny_params_text

pytestmark = pytest.mark.slow

TOP_LEVEL_GENERATED = {".venv", ".git", "data", "models", "metrics", "plots", "checkpoints", "mlflow.db", "mlruns",
                       ".pytest_cache", "dvc.lock"}
TASKS = ("nlvr2", "snli_ve", "vqa", "retrieval")
DISTILL_DOWNSTREAM = {"distill_pretrain", *(f"distill_finetune@{run}" for run in TINY_RUNS),
                      *(f"evaluate@{task}" for task in TASKS), *(f"export@{task}" for task in TASKS), "benchmark",
                      "report"}


def _copy_repo(dest: Path) -> None:
    def ignore(directory, names):
        here = Path(directory).resolve()
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if here == ROOT.resolve():
            skip |= TOP_LEVEL_GENERATED & set(names)
        elif here == (ROOT / "reports").resolve():
            skip |= {n for n in names if n != "templates"}
        elif here == (ROOT / ".dvc").resolve():
            skip |= {"cache", "tmp"} & set(names)
        return skip

    shutil.copytree(ROOT, dest, ignore=ignore)


def _run(args: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    _copy_repo(repo)
    (repo / "params.yaml").write_text(tiny_params_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "VLDISTILL_PARAMS_AUDIT": str(repo.parent / "params_read")}  # vldistill.params_audit
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    first = _run(["dvc", "repro"], repo, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "repro"], cwd=repo, check=True, env=env)
    return repo, env, first


def test_every_stage_ran_and_wrote_its_contract_files(repo):
    path, _, first = repo
    assert _stages_run(first.stdout) == {
        "prepare@pretrain", *(f"prepare@{task}" for task in TASKS), "tokenizer", "teacher_pretrain",
        *(f"teacher_finetune@{task}" for task in TASKS), *DISTILL_DOWNSTREAM, "deploy_benchmark"}
    for model in ("teacher", *(f"{v}_seed{seed}" for v in ("dual_gt", "dide") for seed in TINY_SEEDS)):
        scores = json.loads((path / f"metrics/eval/nlvr2/{model}.json").read_text())
        for split in ("dev", "test"):
            assert 0.0 <= scores[split]["accuracy"] <= 1.0
    for run in TINY_RUNS.values():
        for seed in TINY_SEEDS:  # one replica per seed, each its own model
            scores = json.loads((path / f"metrics/eval/{run['task']}/{run['variant']}_seed{seed}.json").read_text())
            metric = {"nlvr2": "accuracy", "snli_ve": "accuracy", "vqa": "vqa_score", "retrieval": "ir_r1"}[run["task"]]
            assert 0.0 <= scores["test"][metric] <= 1.0
            assert (path / f"models/distill_finetune/{run['task']}/{run['variant']}/seed{seed}").is_dir()
            summary = json.loads((path / f"metrics/train/distill_finetune/{run['task']}/{run['variant']}"
                                         f"/seed{seed}.json").read_text())
            assert summary["seed"] == seed
    retrieval = json.loads((path / "metrics/eval/retrieval/teacher.json").read_text())["test"]
    assert set(retrieval) == {"ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "r_mean"}
    assert retrieval["ir_r1"] <= retrieval["ir_r5"] <= retrieval["ir_r10"]
    latency = json.loads((path / "metrics/bench/latency.json").read_text())
    assert set(latency["embedded"]) == {"nlvr2", "snli_ve", "vqa"}
    row = latency["embedded"]["nlvr2"]["1"]
    assert row["teacher_ms"] > 0 and row["dual_cached_ms"] > 0
    assert row["speedup_cached"] == pytest.approx(row["teacher_ms"] / row["dual_cached_ms"], rel=0.01)
    for task in ("pretrain", "nlvr2", "snli_ve", "vqa", "retrieval"):
        assert (path / f"reports/data/{task}_examples.png").stat().st_size > 10_000
        assert json.loads((path / f"metrics/data/{task}.json").read_text())["splits"]["test"]["examples"] > 0
    for curve in ("teacher_pretrain/pretrain.csv", "teacher_finetune/nlvr2.csv", "distill_finetune/nlvr2/dide/seed0.csv"):
        header = (path / "plots/train" / curve).read_text().splitlines()[0].split(",")
        assert {"step", "lr", "loss"} <= set(header)


def test_report_holds_this_runs_numbers(repo):
    path, _, _ = repo
    report = (path / "reports/results.md").read_text()
    assert (path / "reports/results.ipynb").is_file() and (path / "reports/figures/nlvr2_curves.png").is_file()
    for model, label in (("teacher", "ViLT teacher"), ("dual_gt", "ground-truth labels only"), ("dide", "DiDE")):
        files = ([f"{model}.json"] if model == "teacher" else [f"{model}_seed{seed}.json" for seed in TINY_SEEDS])
        tests = [json.loads((path / "metrics/eval/nlvr2" / name).read_text())["test"]["accuracy"] for name in files]
        line = next(l for l in report.splitlines() if label in l)  # its row of table 1
        assert f"{100 * sum(tests) / len(tests):.1f}" in line  # the teacher's value, a student's mean over seeds
        assert (" ± " in line) == (model != "teacher")
    assert "missing: " not in report  # no file this run should have written is absent
    assert "## Findings" in report and "**1. DiDE" in report
    assert (path / "reports/figures/headline.png").stat().st_size > 10_000


def _covered(key: str, declared: set[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def test_every_stage_declares_the_params_it_reads(repo):
    """Each stage's process recorded the params fields it read (``vldistill.params_audit``); every one must be a
    param the stage declares in dvc.yaml (as resolved in dvc.lock), or changing it would leave the stage stale."""
    import yaml

    path, _, _ = repo
    lock = yaml.safe_load((path / "dvc.lock").read_text())["stages"]
    declared = {entry["cmd"]: set((entry.get("params") or {}).get("params.yaml", {})) for entry in lock.values()}
    records = [json.loads(f.read_text()) for f in sorted((path.parent / "params_read").glob("*.json"))]
    assert len(records) >= len(lock)
    undeclared = {}
    for record in records:
        cmd = " ".join(["python", *record["argv"]])
        if cmd not in declared:  # a stage run by a later test with -S overrides
            continue
        gaps = sorted(k for k in record["keys"] if not _covered(k, declared[cmd]))
        if gaps:
            undeclared[cmd] = gaps
    assert not undeclared, f"stages read params that dvc.yaml does not declare for them: {undeclared}"


def test_second_repro_does_nothing(repo):
    path, env, _ = repo
    again = _run(["dvc", "repro"], path, env)
    assert again.returncode == 0 and not _stages_run(again.stdout), again.stdout


def test_mlflow_has_one_run_per_stage_execution(repo):
    path, _, _ = repo
    with sqlite3.connect(path / "mlflow.db") as db:
        stages = [r[0] for r in db.execute("select value from tags where key = 'stage'")]
        params = db.execute("select count(*) from params").fetchone()[0]
        metrics = db.execute("select count(*) from metrics").fetchone()[0]
    assert sorted(stages) == sorted(["prepare"] * 5 + ["tokenizer", "teacher_pretrain"] + ["teacher_finetune"] * 4
                                    + ["distill_pretrain"] + ["distill_finetune"] * (len(TINY_RUNS) * len(TINY_SEEDS))
                                    + ["evaluate"] * 4 + ["export"] * 4 + ["benchmark", "deploy_benchmark", "report"])
    assert params > 50 and metrics > 20


def _stages_with_changed_params(path: Path, env: dict, *overrides: str) -> set[str]:
    """The stages whose declared params ``dvc status`` finds changed once ``overrides`` (``key=value``, as
    ``dvc exp run -S`` takes them) are written into params.yaml; params.yaml is restored after."""
    import yaml

    from vldistill.config import _apply_override

    params_file = path / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    for override in overrides:
        _apply_override(params, override)
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        status = _run(["dvc", "status", "--json"], path, env)
        assert status.returncode == 0, status.stderr
        return set(json.loads(status.stdout))
    finally:
        params_file.write_text(original)


def test_the_readme_knob_changes_the_params_of_the_distillation_stages_only(repo):
    """``distill.layers`` (README, Everyday use) is a declared param of the distillation stages, of the exports
    (their model cards record the recipe) and of the report (its ablation tables show each row's recipe), of nothing
    upstream. ``dvc status`` (no stage runs) shows the stages it changes directly; what they feed (evaluate,
    benchmark) reruns after them, as the experiment below shows for a knob of its own."""
    path, env, _ = repo
    direct = {stage for stage in DISTILL_DOWNSTREAM if stage.startswith(("distill_", "export@"))} | {"report"}
    assert _stages_with_changed_params(path, env, "distill.layers=layerwise") == direct


def test_one_knob_experiment_reruns_only_downstream_stages(repo):
    """``dvc exp run -S evaluate.rerank_k=4`` (retrieval of the fusion models re-ranks the DiDE student's top 4):
    the four evaluations rerun, then the report that reads their metrics and the retrieval export, whose model
    card quotes the retrieval metrics that changed (the other evaluations write the same files again, so their
    exports stay cached), and nothing else; the experiment's runs carry its name in MLflow and ``dvc exp show``
    lists it with its metrics."""
    path, env, _ = repo
    exp = _run(["dvc", "exp", "run", "-S", "evaluate.rerank_k=4"], path, env)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert _stages_run(exp.stdout) == {*(f"evaluate@{task}" for task in TASKS), "export@retrieval", "report"}
    shown = _run(["dvc", "exp", "show", "--no-pager", "--md"], path, env)
    assert "rerank_k" in shown.stdout and "accuracy" in shown.stdout
    with sqlite3.connect(path / "mlflow.db") as db:
        exp_names = {r[0] for r in db.execute("select value from tags where key = 'dvc_exp'")}
    assert exp_names - {""}, "runs under `dvc exp run` carry the experiment name"


def test_bad_knob_fails_fast_with_one_line(repo):
    path, env, _ = repo
    start = time.perf_counter()
    bad = _run(["dvc", "exp", "run", "-S", "distill.layers=lasst"], path, env, timeout=300)
    elapsed = time.perf_counter() - start
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=path, env=env)
    assert bad.returncode != 0
    ours = [l for l in (bad.stdout + bad.stderr).splitlines() if l.startswith("error: ")]
    assert len(ours) == 1 and "distill.layers" in ours[0] and "'last' or 'layerwise'" in ours[0], bad.stderr
    assert elapsed < 60


def test_fusion_student_with_distillvlm_losses_trains_through_the_stage(repo):
    """Run last: it overwrites the dide student of the tiny repo with a small fusion student (DistillVLM losses)."""
    path, env, _ = repo
    out = _run(["python", "stages/distill_finetune.py", "--task", "nlvr2", "--variant", "dide",
                "-S", "student.kind=fusion", "-S", "student.num_layers=1",
                "-S", "distill.knowledge=[gt, soft, hidden, attn_mse, token_nce]", "-S", "distill.layers=layerwise", "-S", "seeds=[0]"],
               path, env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((path / "metrics/train/distill_finetune/nlvr2/dide/seed0.json").read_text())
    assert summary["knowledge"] == "gt+soft+hidden+attn_mse+token_nce" and 0 <= summary["dev_accuracy"] <= 1
    assert (path / "models/distill_finetune/nlvr2/dide/seed0/heads.json").is_file()
