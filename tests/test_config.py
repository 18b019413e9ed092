"""params.yaml schema: the committed file is valid; every bad value fails in ONE line naming key, value, choices."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from vldistill import paths
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
    ("ablation.tables={knowledge: [dual_gt, telepathy]}",
     ["ablation.tables.knowledge[1]", "telepathy", "not a variant that runs trains on ablation.task=nlvr2"]),
    ("ablation.tables={knowledge: [fusion_gt]}",  # a variant, trained on vqa and retrieval but not on nlvr2
     ['ablation.tables.knowledge[0]="fusion_gt"', "ablation.task=nlvr2", "(have: ['dide', 'dual_gt', 'soft', "]),
    ("ablation.tables={colours: []}", ["ablation.tables.colours", "knowledge"]),
    ("ablation.variants=[soft]", ["unknown key 'ablation.variants'", "allowed keys: task, tables"]),  # rows are runs
    ("ablation.budget={epochs: 1}", ["unknown key 'ablation.budget'", "allowed keys: task, tables"]),  # runs' budget
    ("seeds=[1, 1]", ["seeds=[1, 1]", "distinct"]),
    ("seeds=[]", ["seeds=[]", "non-empty"]),
    ("seeds=[0, -1]", ["seeds=[0, -1]", "non-negative"]),
    ("seeds=[0, 1.5]", ["seeds[1]=1.5", "integer"]),
    ("seeds=3", ["seeds=3", "list"]),
    ("report.seeds=[0, 1]", ["unknown key 'report.seeds'", "allowed keys: decimals"]),  # seeds is top level now
    ("variants.dide={seed: 1}", ["unknown key 'variants.dide.seed'", "knowledge"]),  # every run trains every seed
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
    ("ablation.task=vqa", 'ablation.tables.knowledge[1]="soft": not a variant that runs trains on ablation.task=vqa '
                          "(have: ['dide', 'dual_gt', 'fusion_gt', 'fusion_distillvlm'])"),
    ("seeds=[1, 1]", "seeds=[1, 1]: must be a non-empty list of distinct non-negative ints"),
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


def test_ablation_task_must_be_a_task_once_a_table_names_rows():
    """A table's rows are runs on ``ablation.task``, so that task must be in ``tasks``; with no table the ablation
    study is off and its task is not looked at."""
    nlvr2_only = ["tasks=[nlvr2]", "runs={nlvr2-dide: {task: nlvr2, variant: dide}, "
                                   "nlvr2-dual_gt: {task: nlvr2, variant: dual_gt}}", "ablation.task=vqa"]
    with pytest.raises(ConfigError) as info:
        load(ROOT / "params.yaml", nlvr2_only)
    assert str(info.value) == f"{ROOT / 'params.yaml'}: ablation.task=\"vqa\": not in tasks ['nlvr2']"
    assert load(ROOT / "params.yaml", [*nlvr2_only, "ablation.tables={}"]).ablation.tables == {}
    table = load(ROOT / "params.yaml", [*nlvr2_only[:2], "ablation.tables={knowledge: [dual_gt]}"])
    assert table.ablation.tables == {"knowledge": ["dual_gt"]}


def test_every_run_trains_one_replica_per_seed():
    """Each run of ``runs`` is trained once per seed of ``seeds`` (schema default and params.yaml: 0, 1, 2): model
    ``<variant>_seed<k>``, variant by variant in the order of ``runs``; an ablation row is such a run on
    ``ablation.task``, so its replicas are the task's models (same seeds and budget as the main runs)."""
    assert Params().seeds == [0, 1, 2] and load(ROOT / "params.yaml").seeds == [0, 1, 2]
    params = load(ROOT / "params.yaml", ["seeds=[4, 3]"])
    assert params.task_models("snli_ve") == ["dide_seed4", "dide_seed3", "dual_gt_seed4", "dual_gt_seed3"]
    task = params.ablation.task
    models = params.task_models(task)
    assert models == [f"{v}_seed{k}" for v in params.task_variants(task) for k in (4, 3)]
    assert len(set(models)) == len(models) == 2 * len(params.task_variants(task))
    rows = [v for names in params.ablation.tables.values() for v in names]
    assert rows and all({f"{v}_seed4", f"{v}_seed3"} <= set(models) for v in rows)
    assert params.task_models("nlvr2")[:4] == ["dide_seed4", "dide_seed3", "dual_gt_seed4", "dual_gt_seed3"]
    assert load(ROOT / "params.yaml", ["tasks=[nlvr2]", "runs={nlvr2-dide: {task: nlvr2, variant: dide}}",
                                        "ablation.tables={}"]).task_models("vqa") == []


def test_replica_paths_are_the_stage_outputs():
    """A replica lives in a ``seed<k>`` sub-folder (or file) of its run's DVC outputs (dvc.yaml's distill_finetune)."""
    assert paths.replica_name("soft_attn_cross", 4) == "soft_attn_cross_seed4"
    model = paths.replica_dir("nlvr2", "soft_attn_cross", 4)
    curve = paths.replica_curve("nlvr2", "soft_attn_cross", 4)
    summary = paths.replica_metrics("nlvr2", "soft_attn_cross", 4)
    assert model.as_posix() == "models/distill_finetune/nlvr2/soft_attn_cross/seed4"
    assert curve.as_posix() == "plots/train/distill_finetune/nlvr2/soft_attn_cross/seed4.csv"
    assert summary.as_posix() == "metrics/train/distill_finetune/nlvr2/soft_attn_cross/seed4.json"
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["distill_finetune"]["do"]
    item = {"${item.task}": "nlvr2", "${item.variant}": "soft_attn_cross"}

    def declared(entries: list) -> list[str]:
        names = [e if isinstance(e, str) else next(iter(e)) for e in entries]
        for placeholder, value in item.items():
            names = [n.replace(placeholder, value) for n in names]
        return names

    assert declared(stage["outs"]) == [model.parent.as_posix()] == [paths.model_dir("distill_finetune", "nlvr2",
                                                                                      "soft_attn_cross").as_posix()]
    assert declared(stage["metrics"]) == [summary.parent.as_posix()]
    assert declared(stage["plots"]) == [curve.parent.as_posix()]
    assert "seeds" in stage["params"] and "seed" not in stage["params"]


def test_replica_names_do_not_clash():
    """``<variant>_seed<k>`` is one name per (variant, seed), as variant names are letters, digits and '_' and the
    seed is the digits after the last ``_seed``: a variant called ``soft_seed0`` (model ``soft_seed0_seed0``) stands
    beside ``soft``'s seed-0 replica (``soft_seed0``), in its own folder. No clash check is needed any more (there was
    one while ablation models ``<variant>_seed<k>`` shared ``models/distill_finetune/<task>/`` with the main runs)."""
    params = load(ROOT / "params.yaml", ["seeds=[0, 1]", "variants.soft_seed0={knowledge: [soft]}",
                                         "runs.nlvr2-soft_seed0={task: nlvr2, variant: soft_seed0}"])
    models = params.task_models("nlvr2")
    assert len(set(models)) == len(models) and {"soft_seed0", "soft_seed0_seed0", "soft_seed0_seed1"} <= set(models)
    dirs = {paths.replica_dir("nlvr2", v, k) for v in params.task_variants("nlvr2") for k in params.seeds}
    assert len(dirs) == len(models)
    assert paths.replica_dir("nlvr2", "soft", 0) != paths.replica_dir("nlvr2", "soft_seed0", 0)
    evals = {paths.eval_metrics("nlvr2", m) for m in ["teacher", *models]}
    assert len(evals) == 1 + len(models)


def test_teacher_is_not_a_variant_name():
    """The report reads ``teacher`` as the fine-tuned teacher's one run: a student of that name would be shown as it."""
    with pytest.raises(ConfigError, match="variants.teacher"):
        load(ROOT / "params.yaml", ["variants.teacher={}", "runs.nlvr2-teacher={task: nlvr2, variant: teacher}"])


def test_an_ablation_table_lists_each_row_once():
    with pytest.raises(ConfigError, match=r"ablation.tables.layers=\['layerwise', 'layerwise'\]: lists a variant twice"):
        load(ROOT / "params.yaml", ["ablation.tables.layers=[layerwise, layerwise]"])
