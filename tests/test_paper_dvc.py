"""The README's paper-scale command starts: with ``params.paper.yaml`` as ``params.yaml`` in a copy of the
repository, DVC parses ``dvc.yaml`` (every ``${...}`` it interpolates and every param a stage declares exists),
``dvc status`` answers and ``dvc repro --dry`` lists the paper pipeline's stages -- no data, weights or GPU needed.

``--dry`` runs with ``-f``: without it DVC 3 reads the hashes of file dependencies that no stage has written yet
(``data/prepared/<task>/train.parquet`` of the tokenizer) and stops, for the embedded params as for the paper ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PAPER_TASKS = ("nlvr2", "snli_ve", "vqa", "retrieval")
KNOWLEDGE_TABLE = ["gt", "soft", "soft_hidden", "soft_attn_all", "soft_attn_cross", "soft_attn_uni"]


def _paper_stages(runs: list[str], ablation: list[str], seeds: list[int]) -> set[str]:
    """Every stage ``dvc.yaml`` expands to under the paper params."""
    return {"prepare@pretrain", *(f"prepare@{t}" for t in PAPER_TASKS), "tokenizer", "teacher_pretrain",
            *(f"teacher_finetune@{t}" for t in PAPER_TASKS), "distill_pretrain",
            *(f"distill_finetune@{r}" for r in runs), *(f"distill_ablation@{v}-{s}" for v in ablation for s in seeds),
            *(f"evaluate@{t}" for t in PAPER_TASKS), *(f"export@{t}" for t in PAPER_TASKS), "benchmark",
            "deploy_benchmark", "report"}


@pytest.fixture(scope="module")
def paper_repo(tmp_path_factory):
    from test_pipeline import _copy_repo

    repo = tmp_path_factory.mktemp("paper") / "repo"
    _copy_repo(repo)
    (repo / "params.yaml").write_text((ROOT / "params.paper.yaml").read_text())  # the README's `cp`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    return repo, env


def _dvc(args: list[str], repo: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ERROR" not in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_paper_params_parse_under_dvc_and_dry_run_lists_every_stage(paper_repo):
    repo, env = paper_repo
    paper = yaml.safe_load((ROOT / "params.paper.yaml").read_text())
    status = _dvc(["status"], repo, env).stdout
    assert "prepare@nlvr2" in status and "report" in status  # nothing run yet: every stage is out of date
    dry = _dvc(["repro", "--dry", "-f"], repo, env).stdout
    listed = re.findall(r"Running stage '([^']+)'", dry)
    assert len(listed) == len(set(listed))
    assert set(listed) == _paper_stages(list(paper["runs"]), [], [])
    assert "python stages/distill_finetune.py --task nlvr2 --variant dide" in dry


def test_paper_ablations_expand_when_switched_on(paper_repo):
    """The ablation variants the paper file defines run as ``distill_ablation@<variant>-<seed>`` once listed (what
    ``dvc exp run -S ablation.variants=[...]`` writes into params.yaml), at the paper's seeds."""
    repo, env = paper_repo
    params = yaml.safe_load((ROOT / "params.paper.yaml").read_text())
    params["ablation"]["variants"] = KNOWLEDGE_TABLE
    params["ablation"]["tables"] = {"knowledge": KNOWLEDGE_TABLE}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        listed = set(re.findall(r"Running stage '([^']+)'", _dvc(["repro", "--dry", "-f"], repo, env).stdout))
        assert listed == _paper_stages(list(params["runs"]), KNOWLEDGE_TABLE, params["report"]["seeds"])
        assert len(params["report"]["seeds"]) >= 3
        from vldistill.config import load

        assert load(repo / "params.yaml").ablation_models("nlvr2")[:3] == ["gt_seed0", "gt_seed1", "gt_seed2"]
    finally:
        (repo / "params.yaml").write_text((ROOT / "params.paper.yaml").read_text())
