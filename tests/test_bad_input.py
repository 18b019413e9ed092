"""Bad input through the real entry points, as a user meets it: a bad params file or ``-S`` override stops a stage
(and ``dvc exp run -S``) within seconds with ONE line ``error: <file>: <dotted.key>=<value>: <what is allowed>`` and
writes nothing; bad official data stops ``stages/prepare.py`` with ONE line naming the file (and line) and what was
expected, and leaves nothing finished-looking behind.

Load-time cases run through ``stages/prepare.py --task pretrain``: every stage validates the whole params file first,
and prepare is both the cheapest entry point to start and the first stage ``dvc repro`` runs. Checks of this machine
(``fabric.devices``, the accelerator) run where they apply: at the start of a training stage."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_params_text
from test_official import _jsonl, karpathy_fixture, nlvr2_fixture, server, snli_fixture, vqa_fixture  # noqa: F401

SIZE = [32, 48]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Stage environment: this checkout's code first, MLflow in a store created once (its first-use INFO lines are
    not what these tests look at)."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", "from vldistill.train.tracking import Tracker\nwith Tracker('init', {}): pass"],
                   env=env, check=True, capture_output=True, timeout=300)
    return env


def _tiny() -> dict:
    return yaml.safe_load(tiny_params_text())


def _stage(script: str, cwd: Path, env: dict, *args: str, params: dict | None = None, timeout: int = 300):
    """Run ``stages/<script>.py`` in ``cwd`` (an empty directory standing for the repository root) with the tiny
    params (or ``params``) written to ``cwd/params.yaml`` and ``args`` (``--task ...``, ``-S key=value`` ...)."""
    path = cwd / "params.yaml"
    if not path.exists() or params is not None:
        path.write_text(yaml.safe_dump(params if params is not None else _tiny(), sort_keys=False))
    out = subprocess.run([sys.executable, str(ROOT / "stages" / f"{script}.py"), "--params", str(path), *args],
                         cwd=cwd, env=env, capture_output=True, timeout=timeout)
    out.stdout, out.stderr = out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")  # keep any \r
    return out


def _one_error_line(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit and exactly one non-empty line on stderr as a terminal shows it (a progress bar that clears
    itself with a carriage return leaves nothing), ``error: ...``, holding every fragment."""
    assert out.returncode != 0, out.stdout[-2000:]
    lines = [shown for line in out.stderr.split("\n") if (shown := line.rsplit("\r", 1)[-1]).strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _written(cwd: Path) -> list[str]:
    """Every file in ``cwd`` except the params file and fixtures (what a failed stage must not have produced)."""
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")
                  if p.is_file() and p.name != "params.yaml" and "fixtures" not in p.relative_to(cwd).parts)


# ---------------------------------------------------------------------------------------------------- bad params
LOAD_TIME = [  # (overrides, fragments of the one error line); the key shown is the one to fix
    (["distill.wieghts.gt=1"], ["unknown key 'distill.wieghts'", "allowed keys:", "weights"]),
    (["student.kind=duel"], ['student.kind="duel"', "'dual' or 'fusion'"]),
    (["train.distill_finetune.lr=-0.001"], ["train.distill_finetune.lr=-0.001", "greater than 0"]),
    (["train.teacher_pretrain.batch_size=0"], ["train.teacher_pretrain.batch_size=0", "greater than or equal to 1"]),
    (["distill.knowledge=[gt, attn_crossmodal]"], ['distill.knowledge[1]="attn_crossmodal"', "'attn_cross'"]),
    (["variants.dide={knowledge: []}"], ["variants.dide.knowledge=[]", "at least one of"]),
    (["student.hidden_size=64"], ["student.hidden_size=64", "must equal teacher.hidden_size=32", "init=scratch"]),
    (["student.num_heads=1"], ["student.num_heads=1", "must equal teacher.num_heads=2", "init=scratch"]),
    (["student.init=scratch", "student.num_heads=3"], ["student.num_heads=3", "must divide", "width 32"]),
    (["student.init=scratch", "student.num_layers=3", "variants.fusion_distillvlm.layers=layerwise"],
     ["student.num_layers=3", "<= teacher.num_layers=2", "'fusion_distillvlm'", "layerwise"]),
    (["distill.weights.gt=0"], ["distill.weights.gt=0.0", "variants.dual_gt.knowledge ['gt']", "weight 0"]),
    (["train.retrieval_negatives=16"], ["train.retrieval_negatives=16", "< train.teacher_finetune.batch_size=16"]),
    (["fabric.devices=2", "train.teacher_finetune.effective_batch=16"],
     ["train.teacher_finetune.effective_batch=16", "batch_size x fabric.devices x fabric.num_nodes = 16 x 2 x 1"]),
    (["fabric.strategy=fsdp"], ["fabric.strategy=fsdp", "not supported", "'ddp'"]),
    (["fabric.precision=16-mixed"], ["fabric.precision=16-mixed", "needs a GPU"]),
    (["data.snli_ve=null"], ["data.snli_ve=null", "'snli_ve' is in tasks", "needs a data source"]),
    (["data.vqa.source=official"], ["data.vqa.root=null", "needs root"]),
    (["runs.nlvr2-dide.variant=dual_gt"], ["runs.nlvr2-dide", "'<task>-<variant>' = 'nlvr2-dual_gt'"]),
    (["ablation.tables={knowledge: [dual_gt, soft_atn_cross]}"],
     ['ablation.tables.knowledge[1]="soft_atn_cross"', "not a variant that runs trains on ablation.task=nlvr2"]),
    (["ablation.task=coco"], ['ablation.task="coco"', "'nlvr2', 'snli_ve', 'vqa' or 'retrieval'"]),
    (["ablation.tables={layers: [layerwise]}"],  # a variant of the file, but no run trains it
     ['ablation.tables.layers[0]="layerwise"', "not a variant that runs trains on ablation.task=nlvr2",
      "(have: ['dide', 'dual_gt', 'soft_attn_cross', 'fusion_soft'])"]),
    (["ablation.tables={distillvlm: [fusion_distillvlm]}"],  # trained, on vqa and retrieval only
     ['ablation.tables.distillvlm[0]="fusion_distillvlm"', "ablation.task=nlvr2"]),
    (["ablation.variants=[soft_attn_cross]"], ["unknown key 'ablation.variants'", "allowed keys: task, tables"]),
    (["train.distill_finetune_tasks={nlvr2: {effective_batch: 24}}"],  # the ablation rows' budget: nlvr2's
     ["train.distill_finetune_tasks.nlvr2.effective_batch=24",
      "multiple of batch_size=16 (with train.distill_finetune)"]),
    (["seeds=[0, 0]"], ["seeds=[0, 0]", "must be a non-empty list of distinct non-negative ints"]),
    (["variants.dide={seed: 1}"], ["unknown key 'variants.dide.seed'", "allowed keys: knowledge, layers, stages"]),
]


@pytest.mark.parametrize("overrides, fragments", LOAD_TIME, ids=[" ".join(o) for o, _ in LOAD_TIME])
def test_bad_override_stops_a_stage_in_one_line(tmp_path, env, overrides, fragments):
    out = _stage("prepare", tmp_path, env, "--task", "pretrain", *(a for o in overrides for a in ("-S", o)))
    line = _one_error_line(out, *fragments)
    assert out.returncode == 2 and re.match(r"^error: \S+params\.yaml: [\w\[\]'.-]+", line), line
    assert _written(tmp_path) == []  # stopped before any work: no data, MLflow store, models or metrics


def test_bad_params_file_stops_a_stage_in_one_line(tmp_path, env):
    """The same through ``--params <file>``: a misspelt key, then a file that is not YAML."""
    params = _tiny()
    params["distill"]["temprature"] = params["distill"].pop("temperature")
    out = _stage("prepare", tmp_path, env, "--task", "pretrain", params=params)
    _one_error_line(out, "params.yaml: unknown key 'distill.temprature'", "temperature")
    (tmp_path / "params.yaml").write_text("seed: 0\ndistill: {layers: last\n")
    out = _stage("prepare", tmp_path, env, "--task", "pretrain")
    _one_error_line(out, "params.yaml: line 3 is not valid YAML")
    assert _written(tmp_path) == []


def test_official_root_that_does_not_exist(tmp_path, env):
    out = _stage("prepare", tmp_path, env, "--task", "nlvr2", "-S", "data.nlvr2.source=official",
                 "-S", "data.nlvr2.root=/no/such/nlvr2")
    _one_error_line(out, 'data.nlvr2.root="/no/such/nlvr2": directory not found', "data.nlvr2.url is not set")
    assert out.returncode == 2 and _written(tmp_path) == []


def test_more_devices_than_this_machine_has(tmp_path, env):
    """Checked by a training stage before it loads anything: on cpu each device is a process, one per core."""
    from vldistill.cli import cpu_cores

    too_many = cpu_cores() + 1
    out = _stage("teacher_pretrain", tmp_path, env, "-S", f"fabric.devices={too_many}", "-S", "fabric.strategy=ddp")
    _one_error_line(out, f"fabric.devices={too_many}", f"{too_many - 1} CPU core(s)")
    assert out.returncode == 2 and _written(tmp_path) == []


def test_accelerator_this_machine_does_not_have(tmp_path, env):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = _stage("distill_finetune", tmp_path, env, "--task", "nlvr2", "--variant", "dide",
                 "-S", "fabric.accelerator=cuda", "-S", "fabric.precision=bf16-mixed")
    _one_error_line(out, "fabric.accelerator=cuda: no CUDA GPU is visible", "fabric.accelerator=cpu")
    assert out.returncode == 2 and _written(tmp_path) == []


def _fake_cuda(monkeypatch, count: int, bf16: bool):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla V100")
    monkeypatch.delenv("SLURM_PROCID", raising=False)


@pytest.mark.parametrize("fabric, cuda, fragments", [
    ({"accelerator": "cuda", "devices": 4}, (2, True), ["fabric.devices=4", "2 CUDA GPU(s)"]),
    ({"accelerator": "gpu", "precision": "bf16-mixed"}, (1, False), ["fabric.precision=bf16-mixed", "Tesla V100",
                                                                      "'16-mixed'"]),
    ({"accelerator": "auto", "precision": "16-mixed"}, (0, False), ["fabric.precision=16-mixed", "found none"]),
    ({"accelerator": "auto", "devices": 64}, (0, False), ["fabric.devices=64", "CPU core(s)"]),
    ({"accelerator": "cuda", "devices": 2, "strategy": "ddp", "precision": "bf16-mixed"}, (2, True), None),
    ({"accelerator": "auto", "precision": "bf16-true"}, (1, True), None),
])
def test_machine_checks_of_fabric(monkeypatch, fabric, cuda, fragments):
    """What :func:`vldistill.cli.machine_error` says for GPUs this machine may not have (torch.cuda faked)."""
    from vldistill.cli import machine_error
    from vldistill.config import FabricParams

    _fake_cuda(monkeypatch, *cuda)
    problem = machine_error(FabricParams(**fabric))
    if fragments is None:
        assert problem is None
        return
    assert problem and "\n" not in problem
    for fragment in fragments:
        assert fragment in problem, problem


def test_bad_knobs_fail_fast_under_dvc_exp_run(tmp_path):
    """``dvc exp run -S`` in a fresh tiny copy of the repository: the first stage fails on each bad knob in seconds,
    with our one line, and nothing is produced."""
    from test_pipeline import _copy_repo

    repo = tmp_path / "repo"
    _copy_repo(repo)
    (repo / "params.yaml").write_text(tiny_params_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    cases = [("distill.knowledge=[gt,telepathy]", 'distill.knowledge[1]="telepathy"'),
             ("+distil.layers=last", "unknown key 'distil'"),  # `+`: dvc adds a key params.yaml does not have
             ("train.distill_finetune.lr=-1", "train.distill_finetune.lr=-1"),
             ("student.hidden_size=64", "student.hidden_size=64: must equal teacher.hidden_size=32"),
             ("fabric.strategy=fsdp", "fabric.strategy=fsdp: not supported")]
    for knob, fragment in cases:
        start = time.perf_counter()
        out = subprocess.run(["dvc", "exp", "run", "-S", knob], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=120)
        elapsed = time.perf_counter() - start
        subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=repo, env=env, check=True)
        ours = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("error: ")]
        assert out.returncode != 0 and len(ours) == 1 and fragment in ours[0], (knob, out.stdout + out.stderr)
        assert elapsed < 60, (knob, elapsed)
    plain = subprocess.run(["dvc", "exp", "run", "-S", "distil.layers=last"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=120)  # without `+`, dvc itself refuses a key params.yaml lacks
    assert plain.returncode != 0 and "distil" in plain.stderr and "Running stage" not in plain.stdout
    for produced in ("data", "models", "metrics", "plots", "checkpoints", "reports/data"):
        assert not [p for p in (repo / produced).rglob("*") if p.is_file()], produced  # dvc makes data/prepared/
    assert not (tmp_path / "mlflow.db").exists()  # no stage got as far as tracking


# ------------------------------------------------------------------------------------------------------ bad data
def _official(task: str, root: Path, **extra) -> dict:
    params = _tiny()
    params["data"][task] = {**params["data"][task], "source": "official", "root": str(root), "image_size": SIZE,
                            **extra}
    return params


def _bad_prepare(tmp_path: Path, env: dict, task: str, params: dict, *fragments: str) -> str:
    """prepare on bad official data: one error line, and no parquet, image store, metrics or figure of the task."""
    out = _stage("prepare", tmp_path, env, "--task", task, params=params)
    line = _one_error_line(out, *fragments)
    produced = [p for p in _written(tmp_path) if p.startswith(("data/", "metrics/", "reports/", "models/"))]
    assert produced == [], produced  # no parquet, image store, metrics or figure; no staging directory either
    return line


def test_missing_image_names_it_and_the_line_that_refers_to_it(tmp_path, env):
    root = nlvr2_fixture(tmp_path / "fixtures/nlvr2")
    (root / "dev/dev-3-1-img1.png").unlink()
    _bad_prepare(tmp_path, env, "nlvr2", _official("nlvr2", root),
                 "dev-3-1-img1.png: image not found", "(referenced by ", "dev.json:1)")


def test_truncated_png(tmp_path, env):
    root = nlvr2_fixture(tmp_path / "fixtures/nlvr2")
    path = root / "images/train/7/train-10-0-img0.png"
    path.write_bytes(path.read_bytes()[:60])
    _bad_prepare(tmp_path, env, "nlvr2", _official("nlvr2", root),
                 "train-10-0-img0.png: cannot decode image", "truncated", "expected a complete image file", "train.json:1")


def test_truncated_jpeg(tmp_path, env):
    root = snli_fixture(tmp_path / "fixtures/snli")
    path = root / "flickr30k_images/1000.jpg"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    _bad_prepare(tmp_path, env, "snli_ve", _official("snli_ve", root),
                 "flickr30k_images/1000.jpg: cannot decode image", "truncated", "snli_ve_train.jsonl:1")


def test_malformed_json_line(tmp_path, env):
    root = nlvr2_fixture(tmp_path / "fixtures/nlvr2")
    lines = (root / "train.json").read_text().splitlines()
    (root / "train.json").write_text(lines[0] + "\n\n" + lines[1][:-3] + "\n")  # a blank line, then a cut-off record
    _bad_prepare(tmp_path, env, "nlvr2", _official("nlvr2", root), "train.json:3: malformed JSON")


def test_json_line_without_a_field(tmp_path, env):
    root = snli_fixture(tmp_path / "fixtures/snli")
    _jsonl(root / "snli_ve_test.jsonl", [{"Flickr30K_ID": "1000", "gold_label": "neutral"}])
    _bad_prepare(tmp_path, env, "snli_ve", _official("snli_ve", root),
                 "snli_ve_test.jsonl:1: missing key 'sentence2'", "expected keys: Flickr30K_ID, sentence2, gold_label")


def test_unknown_label(tmp_path, env):
    root = snli_fixture(tmp_path / "fixtures/snli")
    rows = [{"Flickr30K_ID": "1000", "sentence2": "a", "gold_label": "neutral"},
            {"Flickr30K_ID": "1000", "sentence2": "b", "gold_label": "contradictory"}]
    _jsonl(root / "snli_ve_dev.jsonl", rows)
    _bad_prepare(tmp_path, env, "snli_ve", _official("snli_ve", root), "snli_ve_dev.jsonl:2: label 'contradictory'",
                 "['entailment', 'neutral', 'contradiction']")


def test_empty_split(tmp_path, env):
    root = nlvr2_fixture(tmp_path / "fixtures/nlvr2")
    (root / "test1.json").write_text("\n")
    _bad_prepare(tmp_path, env, "nlvr2", _official("nlvr2", root), "test1.json: no examples", "test split")


def test_download_checksum_mismatch(tmp_path, env, server):  # noqa: F811 - the fixture imported above
    """A missing root with ``url`` set is downloaded; a wrong ``sha256`` stops prepare naming the file and both
    digests, and neither the archive nor its partial download is left."""
    import zipfile

    served, url = server
    fixture = snli_fixture(tmp_path / "fixtures/snli")
    with zipfile.ZipFile(served / "snli.zip", "w") as zf:
        for f in fixture.rglob("*"):
            if f.is_file():
                zf.write(f, f.relative_to(fixture))
    digest = hashlib.sha256((served / "snli.zip").read_bytes()).hexdigest()
    wrong = "0" * 64
    root = tmp_path / "fixtures/downloaded/snli_ve"
    line = _bad_prepare(tmp_path, env, "snli_ve", _official("snli_ve", root, url=f"{url}/snli.zip", sha256=wrong),
                        "snli_ve-snli.zip: sha256 mismatch", f"expected {wrong}", f"got {digest}")
    assert "partial file was removed" in line
    assert not list((tmp_path / "fixtures/downloaded").glob("*"))
    missing = _stage("prepare", tmp_path, env, "--task", "snli_ve",
                     params=_official("snli_ve", root, url=f"{url}/nope.zip", sha256=digest))
    _one_error_line(missing, "/nope.zip: download to", "snli_ve-nope.zip failed (")  # the test server drops it


# ----------------------------------------------------- more bad data, through the library (the same code path, faster)
def _library_error(task: str, cfg, tmp_path: Path, *fragments: str) -> str:
    from vldistill.config import SceneParams
    from vldistill.data.official import DataError
    from vldistill.data.prepared import prepare

    with pytest.raises(DataError) as info:
        prepare(task, cfg, SceneParams(), 0, tmp_path / "prepared", tmp_path / "metrics.json")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "prepared" / task).exists() and not (tmp_path / "metrics.json").exists()
    assert not list((tmp_path / "prepared").glob(".*"))  # no staging directory left
    return message


def test_karpathy_records(tmp_path):
    import json

    from vldistill.config import RetrievalData

    root = karpathy_fixture(tmp_path / "flickr30k", "flickr30k")
    cfg = RetrievalData(source="official", root=str(root), image_size=SIZE)
    good = (root / "dataset_flickr30k.json").read_text()
    data = json.loads(good)
    data["images"][2]["split"] = "validation"
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    _library_error("retrieval", cfg, tmp_path, "dataset_flickr30k.json: image 2 has split 'validation'",
                   "train/restval/val/test")
    data = json.loads(good)
    del data["images"][1]["sentences"]
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    _library_error("retrieval", cfg, tmp_path, "dataset_flickr30k.json: image 1: missing key 'sentences'")
    data = json.loads(good)
    data["images"] = [im for im in data["images"] if im["split"] != "test"]
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    _library_error("retrieval", cfg, tmp_path, "dataset_flickr30k.json: no captions with split test")
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": {"0": data["images"][0]}}))
    _library_error("retrieval", cfg, tmp_path, "dataset_flickr30k.json: expected a JSON object with a list under "
                   "'images'")


def test_vqa_records(tmp_path):
    import json

    from vldistill.config import VqaData

    root = vqa_fixture(tmp_path / "vqa")
    cfg = VqaData(source="official", root=str(root), image_size=SIZE, holdout_images=1)
    path = root / "v2_mscoco_val2014_annotations.json"
    good = path.read_text()
    data = json.loads(good)
    data["annotations"] = data["annotations"][:-1]
    path.write_text(json.dumps(data))
    _library_error("vqa", cfg, tmp_path, "v2_mscoco_val2014_annotations.json: no annotation for question_id 50")
    path.write_text(good)
    questions = root / "v2_OpenEnded_mscoco_train2014_questions.json"
    data = json.loads(questions.read_text())
    data["questions"][1]["image_id"] = "two"
    questions.write_text(json.dumps(data))
    _library_error("vqa", cfg, tmp_path, "v2_OpenEnded_mscoco_train2014_questions.json: question 1: unexpected value")


def test_json_lines_that_are_not_objects_or_not_strings_or_not_utf8(tmp_path):
    from vldistill.config import Nlvr2Data

    root = nlvr2_fixture(tmp_path / "nlvr2")
    cfg = Nlvr2Data(source="official", root=str(root), image_size=SIZE)
    good = (root / "dev.json").read_text()
    (root / "dev.json").write_text(good + "[1, 2]\n")
    _library_error("nlvr2", cfg, tmp_path, "dev.json:2: expected a JSON object per line, got list")
    (root / "dev.json").write_text(good.replace('"A bird."', "null"))
    _library_error("nlvr2", cfg, tmp_path, "dev.json:1: unexpected value (text None is not a string)")
    (root / "dev.json").write_bytes(good.encode() + b'{"sentence": "caf\xe9"}\n')
    _library_error("nlvr2", cfg, tmp_path, "dev.json:2: not UTF-8 text")
