"""params.yaml schema: the committed file is valid; every bad value fails in ONE line naming key, value, choices."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from vldistill.config import ConfigError, Params, flatten, load

from conftest import ROOT


def test_committed_params_are_valid():
    params = load(ROOT / "params.yaml")
    assert params.tasks == ["nlvr2", "snli_ve", "vqa", "retrieval"]
    assert {run.task for run in params.runs.values()} == set(params.tasks)
    assert params.variant("dual_gt").knowledge == ["gt"]
    assert params.variant("dide").knowledge == list(params.distill.knowledge)


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """``lr: 1e-4`` in the file and ``-S ...lr=1e-3`` on the command line are floats (YAML 1.1 would give strings,
    which the schema rejects), as DVC's own ``-S`` parser reads them; ``1.0e-4`` and plain ints are unchanged."""
    text = (ROOT / "params.yaml").read_text().replace("lr: 1.0e-3", "lr: 1e-4", 1)
    assert "lr: 1e-4" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load(tmp_path / "params.yaml",
                  ["train.distill_finetune.lr=5E-4", "seed=7", "train.teacher_finetune.lr=+2e-3"])
    assert params.train.teacher_pretrain.lr == pytest.approx(1e-4)
    assert params.train.distill_finetune.lr == pytest.approx(5e-4)
    assert params.train.teacher_finetune.lr == pytest.approx(2e-3)
    assert params.seed == 7 and isinstance(params.seed, int)


@pytest.mark.parametrize("override, expected", [
    ("distill.layers=lasst", ["distill.layers", "lasst", "'last' or 'layerwise'"]),
    ("distil.layers=last", ["unknown key 'distil'", "distill"]),
    ("distill.foo=1", ["unknown key 'distill.foo'", "knowledge"]),
    ("train.teacher_finetune.lr=-1", ["train.teacher_finetune.lr", "-1", "greater than 0"]),
    ("train.teacher_finetune.batch_size=0", ["train.teacher_finetune.batch_size", "0"]),
    ("distill.knowledge=[]", ["distill.knowledge", "at least one"]),
    ("distill.knowledge=[gt, telepathy]", ["distill.knowledge[1]", "telepathy", "attn_cross"]),
    ("distill.stages=[pretrain]", ["distill.stages", "finetune"]),
    ("fabric.precision=16-mixed", ["fabric", "16-mixed", "GPU"]),
    ("fabric.strategy=horovod", ["fabric.strategy", "horovod", "ddp"]),
    ("tasks=[nlvr2, coco]", ["tasks[1]", "coco", "nlvr2"]),
    ("seed=abc", ["seed", "abc", "integer"]),
    ("teacher.hidden_size=130", ["teacher", "multiple of num_heads"]),
    ("data.nlvr2.templates=[contains, teleport]", ["data.nlvr2.templates[1]", "teleport"]),
    ("variants.x={layers: sideways}", ["variants.x.layers", "sideways"]),
    ("bench.batch_sizes=[]", ["bench", "batch_sizes"]),
    ("student.kind=triple", ["student.kind", "triple", "'dual' or 'fusion'"]),
    ("distill.nce.queue_size=0", ["distill.nce.queue_size", "0"]),
    ("teacher.init=vilt", ['teacher.init="vilt"', "owner/name"]),
    ("teacher.init=' dandelin/vilt-b32-mlm'", ["teacher.init", "owner/name"]),
    ("teacher.finetuned={coco: dandelin/vilt-b32-mlm}", ["teacher.finetuned.coco", "'nlvr2'"]),
    ("teacher.finetuned={vqa: vilt}", ['teacher.finetuned.vqa="vilt"', "owner/name"]),
    ("train.augment.magnitude=31", ["train.augment.magnitude=31", "30"]),
    ("train.augment.stages=[teacher_pretrain]", ["train.augment.stages[0]", "teacher_pretrain"]),
    ("train.augment.randaugment=true", ["distill.cache_teacher=true", "train.augment"]),
    ("train.distill_finetune_tasks={nlvr2: {effective_batch: 100}}",
     ["train.distill_finetune_tasks.nlvr2.effective_batch=100", "multiple of batch_size"]),
    ("train.teacher_finetune_tasks={nlvr2: {epoch: 3}}",
     ["unknown key 'train.teacher_finetune_tasks.nlvr2.epoch'", "epochs"]),
    ("ablation.variants=[dide, telepathy]", ["ablation.variants", "telepathy", "not in variants"]),
    ("ablation.tables={knowledge: [dide]}", ["ablation.tables.knowledge", "dide", "not in ablation.variants"]),
    ("ablation.tables={colours: []}", ["ablation.tables.colours", "knowledge"]),
    ("report.seeds=[1, 1]", ["report.seeds", "distinct"]),
    ("report.seeds=[]", ["report.seeds", "non-empty"]),
])
def test_bad_values_fail_in_one_line(override, expected):
    with pytest.raises(ConfigError) as info:
        load(ROOT / "params.yaml", [override])
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, message


@pytest.mark.parametrize("override, key", [
    ("data.nlvr2=null", "data.nlvr2=null: task 'nlvr2' is in tasks"),
    ("variants.x-y={}", "variants.x-y: a variant name"),
    ("runs.nlvr2-dide.task=vqa", "runs.nlvr2-dide: the key must be '<task>-<variant>' = 'vqa-dide'"),
    ("ablation.variants=[dide, dide]", "ablation.variants=['dide', 'dide']: lists a variant twice"),
    ("report.seeds=[1, 1]", "report.seeds=[1, 1]: must be"),
])
def test_whole_file_checks_name_their_key(override, key):
    """Checks across sections say which key to fix; they never dump the whole params (`<top level>={'seed': ...`)."""
    with pytest.raises(ConfigError) as info:
        load(ROOT / "params.yaml", [override])
    assert str(info.value).startswith(f"{ROOT / 'params.yaml'}: {key}"), str(info.value)
    assert "<top level>" not in str(info.value) and len(str(info.value)) < 400


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_stage_cli_exits_nonzero_with_one_line(tmp_path, python):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["distill"]["layers"] = "lasst"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    out = subprocess.run([python, str(ROOT / "stages/distill_pretrain.py"), "--params", str(path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "distill.layers" in lines[0] and "lasst" in lines[0], out.stderr
    assert not any(tmp_path.glob("models")) and not any(tmp_path.glob("metrics"))


def test_fusion_student_params_load():
    params = load(ROOT / "params.yaml", ["student.kind=fusion", "student.num_layers=2",
                                        "distill.knowledge=[gt, soft, attn_mse, token_nce]"])
    assert params.student.kind == "fusion" and params.distill.nce.queue_size > 0


def test_flatten_gives_dotted_keys():
    flat = flatten(Params())
    assert flat["distill.layers"] == "last"
    assert flat["train.teacher_finetune.lr"] > 0


def test_ablation_runs_are_variants_with_a_seed_and_the_ablation_budget():
    params = load(ROOT / "params.yaml", ["ablation.budget={epochs: 1}", "report.seeds=[3, 4]"])
    assert params.ablation_models("snli_ve") == []
    models = params.ablation_models(params.ablation.task)
    assert len(models) == 2 * len(params.ablation.variants) and "soft_attn_cross_seed4" in models
    run, name = params.for_ablation("soft_attn_cross", 4)
    assert name == "soft_attn_cross_seed4" and run.variant_seed(name) == 4
    assert run.variant(name) == params.variant("soft_attn_cross")
    assert run.budget("distill_finetune", params.ablation.task).epochs == 1
    kept = params.budget("distill_finetune", params.ablation.task)
    assert run.budget("distill_finetune", params.ablation.task).model_copy(update={"epochs": kept.epochs}) == kept
    assert params.budget("distill_finetune", params.ablation.task).epochs != 1  # the main runs keep theirs
    with pytest.raises(ConfigError, match="report.seeds"):
        params.for_ablation("soft_attn_cross", 0)


def test_ablation_model_names_may_not_clash_with_main_runs():
    with pytest.raises(ConfigError, match="clash"):
        load(ROOT / "params.yaml", ["variants.soft_seed0={}", "runs.nlvr2-soft_seed0={task: nlvr2, variant: soft_seed0}"])
