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
ABLATION_RUNS = ["soft", "soft_hidden", "soft_attn_all", "soft_attn_cross", "soft_attn_uni"]
"""The knowledge table's rows that the paper file defines as variants but does not train."""
KNOWLEDGE_TABLE = ["dual_gt", *ABLATION_RUNS]
"""DiDE's knowledge table: its gt row is ``dual_gt``, a run of the paper file already."""


def _paper_stages(runs: list[str]) -> set[str]:
    """Every stage ``dvc.yaml`` expands to under the paper params: one ``distill_finetune`` per run of ``runs``
    (whatever ``seeds`` holds: the replicas of a run are trained by its one stage), no other training stage."""
    return {"prepare@pretrain", *(f"prepare@{t}" for t in PAPER_TASKS), "tokenizer", "teacher_pretrain",
            *(f"teacher_finetune@{t}" for t in PAPER_TASKS), "distill_pretrain",
            *(f"distill_finetune@{r}" for r in runs),
            *(f"evaluate@{t}" for t in PAPER_TASKS), *(f"export@{t}" for t in PAPER_TASKS), "benchmark",
            "deploy_benchmark", "report"}


def _dry_stages(repo: Path, env: dict) -> tuple[list[str], str]:
    """The stages ``dvc repro --dry -f`` would run (each once) and its output."""
    dry = _dvc(["repro", "--dry", "-f"], repo, env).stdout
    listed = re.findall(r"Running stage '([^']+)'", dry)
    assert len(listed) == len(set(listed)), listed
    return listed, dry


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
    listed, dry = _dry_stages(repo, env)
    assert set(listed) == _paper_stages(list(paper["runs"]))
    assert not any(stage.startswith("distill_ablation") for stage in listed)  # ablation rows are runs now
    assert "python stages/distill_finetune.py --task nlvr2 --variant dide" in dry
    assert paper["seeds"] == [0] and paper["ablation"]["tables"] == {}  # DiDE's single runs, no ablation trained


def test_paper_ablations_expand_when_switched_on(paper_repo):
    """An ablation row is one more run on ``ablation.task``: ``dvc exp run -S '+runs.nlvr2-soft={task: nlvr2,
    variant: soft}' -S '+ablation.tables.knowledge=[dual_gt,soft]'`` (applied here by DVC's own ``-S`` parser, which
    needs the ``+`` for keys the file lacks) adds one ``distill_finetune@nlvr2-<variant>`` stage per row; a table row
    that no run trains on nlvr2 is refused; more seeds mean more replicas in the same stages, not more stages."""
    from dvc.utils.hydra import apply_overrides

    from vldistill.config import ConfigError, load

    repo, env = paper_repo
    path = repo / "params.yaml"
    paper = yaml.safe_load((ROOT / "params.paper.yaml").read_text())
    try:
        apply_overrides(path, [f"+ablation.tables.knowledge=[{','.join(KNOWLEDGE_TABLE)}]"])
        with pytest.raises(ConfigError) as info:  # the table alone: its rows other than dual_gt are not trained
            load(path)
        assert 'ablation.tables.knowledge[1]="soft": not a variant that runs trains on ablation.task=nlvr2 ' \
               "(have: ['dide', 'dual_gt'])" in str(info.value)

        apply_overrides(path, [f"+runs.nlvr2-{v}={{task: nlvr2, variant: {v}}}" for v in ABLATION_RUNS])
        params = load(path)
        runs = [*paper["runs"], *(f"nlvr2-{v}" for v in ABLATION_RUNS)]
        assert list(params.runs) == runs and params.ablation.tables == {"knowledge": KNOWLEDGE_TABLE}
        listed, dry = _dry_stages(repo, env)
        assert set(listed) == _paper_stages(runs)
        for variant in ABLATION_RUNS:
            assert f"python stages/distill_finetune.py --task nlvr2 --variant {variant}" in dry
        assert params.seeds == [0]
        assert params.task_models("nlvr2") == [f"{v}_seed0" for v in ["dide", "dual_gt", *ABLATION_RUNS]]

        apply_overrides(path, ["seeds=[0,1,2]"])
        assert set(_dry_stages(repo, env)[0]) == _paper_stages(runs)
        assert load(path).task_models("nlvr2")[:6] == ["dide_seed0", "dide_seed1", "dide_seed2",
                                                       "dual_gt_seed0", "dual_gt_seed1", "dual_gt_seed2"]
    finally:
        path.write_text((ROOT / "params.paper.yaml").read_text())
