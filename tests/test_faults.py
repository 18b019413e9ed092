"""Faults a training stage survives: a stop signal (SIGINT, SIGTERM) or SIGKILL followed by a rerun, a non-finite
loss, an unreachable MLflow store, a crash while an output is being written, and two experiments of the DVC queue
writing to one MLflow store at once.

Fast tests drive :func:`vldistill.train.loop.fit` in-process on the toy regression of ``test_fabric.py`` and the
writers directly. The slow ones run real stage scripts on one tiny copy of the repository (``tiny_repo``: nlvr2
only, no ablation study, two seeds, built by ``dvc repro`` so that ``dvc exp run --queue`` has a baseline).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning_fabric import Fabric
from safetensors.torch import load_file

from conftest import tiny_params_text
from test_fabric import _Noisy, _toy_split
from vldistill.config import StageBudget
from vldistill.io import atomic_dir, atomic_path, write_json
from vldistill.train import loop, tracking
from vldistill.cli import stage_errors
from vldistill.train.faults import Interrupted, NonFiniteLoss, non_finite_terms
from vldistill.train.loop import fit, write_curve
from vldistill.train.tracking import Tracker


# ---------------------------------------------------------------------------------------------- in-process fit
class _Faulty(_Noisy):
    """``_Noisy`` (dropout, ``random`` and numpy draws in every loss) that, on forward call ``at``, sends itself
    ``send`` (a signal number, or several) or returns a loss term ``'mse'`` = ``value`` (NaN, inf)."""

    def __init__(self, at: int | None = None, send: tuple[int, ...] = (), value: float | None = None):
        super().__init__()
        self.at, self.send, self.value = at, send, value

    def forward(self, batch):
        terms = super().forward(batch)
        if self.calls == self.at:
            for signum in self.send:
                os.kill(os.getpid(), signum)
            if self.value is not None:
                bad = terms["mse"] * self.value
                terms = {"loss": terms["loss"] * self.value, "mse": bad, "aux": torch.tensor(0.5)}
        return terms


def _fit(tmp: Path, make=_Faulty, checkpoint_every: int | None = 3, models: list | None = None):
    """``fit`` as ``test_fabric._fit``: 64 examples, batch 4, effective 8 (accumulate 2) → 8 steps per epoch, 2 epochs,
    a curve row every 4 steps; the model is ``make()`` (after seeding), appended to ``models`` if given."""
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0, verbose=False)
    model = make()
    if models is not None:
        models.append(model)
    split = _toy_split(64)
    budget = StageBudget(epochs=2, batch_size=4, effective_batch=8, lr=0.05, log_every=4,
                         checkpoint_every=checkpoint_every)
    dev = split.collate(list(range(16)))

    def evaluate(m) -> dict[str, float]:
        with torch.no_grad():
            return {"neg_mse": -float(torch.nn.functional.mse_loss(m.module.linear(dev["x"]).squeeze(-1), dev["y"]))}

    result = fit(fabric, model, split.loader(4, True, 0, drop_last=True), evaluate, budget, "neg_mse",
                 tmp / "ckpt", tmp / "curve.csv", "fp", 0)
    return result, model


def _same_fit(a, b) -> None:
    (ra, ma), (rb, mb) = a, b
    assert ra.steps == rb.steps and ra.history == rb.history and ra.best_epoch == rb.best_epoch
    for key, value in ma.state_dict().items():
        assert torch.equal(mb.state_dict()[key], value), key
    for key, value in ra.best_state.items():
        assert torch.equal(rb.best_state[key], value), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("whole")
    return _fit(tmp, checkpoint_every=None), (tmp / "curve.csv").read_text()


@pytest.mark.parametrize("signum, call, stopped_at", [
    (signal.SIGINT, 11, 6),   # forward call 11 = first half of step 6: the step is finished, then checkpointed
    (signal.SIGTERM, 16, 8),  # call 16 = the epoch's last step: after its evaluation and epoch-end checkpoint
])
def test_stop_signal_checkpoints_the_current_step_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, uninterrupted, capfd, signum, call, stopped_at):
    """No ``checkpoint_every``: the only checkpoint is the one the signal asks for. Exit status 128 + signal; the
    signal handlers in place before ``fit`` are back afterwards; the rerun resumes and ends bit for bit as the run
    that was never stopped."""
    previous = signal.signal(signum, signal.SIG_DFL)  # not ignored, whatever pytest was started with
    try:
        with pytest.raises(Interrupted) as stopped:
            _fit(tmp_path, lambda: _Faulty(at=call, send=(signum,)), checkpoint_every=None)
        assert signal.getsignal(signum) is signal.SIG_DFL
    finally:
        signal.signal(signum, previous)
    err = stopped.value
    assert err.exit_code == 128 + signum and err.step == stopped_at and err.checkpoint == tmp_path / "ckpt/last.ckpt"
    assert str(err) == (f"{signal.Signals(signum).name} at step {stopped_at} of 16; checkpoint saved to "
                        f"{tmp_path / 'ckpt/last.ckpt'}; rerun the stage (e.g. dvc repro) to resume from there")
    assert "stopping at the end of this optimizer step with a checkpoint" in capfd.readouterr().err
    saved = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=True)
    assert saved["step"] == stopped_at
    resumed = _fit(tmp_path, checkpoint_every=None)
    _same_fit(uninterrupted[0], resumed)
    assert (tmp_path / "curve.csv").read_text() == uninterrupted[1]


def test_a_second_ctrl_c_aborts_at_once_and_leaves_the_previous_checkpoint(tmp_path):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever pytest was started with
    try:
        with pytest.raises(KeyboardInterrupt):
            _fit(tmp_path, lambda: _Faulty(at=9, send=(signal.SIGINT, signal.SIGINT)))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(tmp_path / "ckpt/last.ckpt", weights_only=True)["step"] == 3  # checkpoint_every=3
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_a_stop_signal_the_process_ignores_stays_ignored(tmp_path):
    """A shell starts background jobs with SIGINT ignored (and ``nohup`` SIGHUP): fit does not take it over."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result, _ = _fit(tmp_path, lambda: _Faulty(at=9, send=(signal.SIGINT,)), checkpoint_every=None)
        assert result.steps == 16 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("value, word", [(math.nan, "nan"), (math.inf, "inf")])
def test_non_finite_loss_term_stops_before_its_step_and_keeps_the_last_checkpoint(tmp_path, value, word):
    """Call 27 = first half of step 14; the last checkpoint (every 3 steps) is step 12's. It is left as it was (not
    rewritten: same bytes), no curve row of the bad step exists, and the error names the term and the step."""
    ckpt = tmp_path / "ckpt/last.ckpt"
    with pytest.raises(NonFiniteLoss) as stopped:
        _fit(tmp_path, lambda: _Faulty(at=27, value=value))
    assert str(stopped.value) == (f"loss term 'mse' is {word} at step 14; last good checkpoint kept at {ckpt} "
                                  f"(step 12)")
    assert isinstance(stopped.value, FloatingPointError) and stopped.value.exit_code == 1
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 12 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_non_finite_gradient_with_a_finite_loss_is_stopped_before_the_optimizer_applies_it(tmp_path):
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * math.inf

    class Model(_Faulty):
        def forward(self, batch):
            terms = super().forward(batch)
            if self.calls == 5:  # step 3 (its first half)
                terms["loss"] = InfGrad.apply(terms["loss"])
            return terms

    models = []
    with pytest.raises(NonFiniteLoss, match=r"^gradient norm is nan or inf \(every loss term finite\) at step 3; "
                                            r"no checkpoint was written before it$"):
        _fit(tmp_path, Model, models=models)
    assert all(torch.isfinite(p).all() for p in models[0].parameters())


def test_non_finite_terms_names_the_terms_not_their_sum():
    assert non_finite_terms({"loss": 1.0, "gt": 0.5}) is None
    assert non_finite_terms({"loss": math.nan, "gt": 0.5, "soft": math.nan}) == "loss term 'soft' is nan"
    assert non_finite_terms({"loss": math.inf, "gt": 0.5}) == "loss term 'loss' is inf"
    assert non_finite_terms({"loss": math.nan, "soft": math.inf, "attn_cross": math.nan}) == \
        "loss terms 'soft' (inf), 'attn_cross' (nan) are not finite"


def test_stage_scripts_print_one_line_and_exit_with_the_status_of_the_stop(capsys, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(SystemExit) as exited:
        with stage_errors("distill_finetune@nlvr2-dide"):
            raise NonFiniteLoss("loss term 'soft' is nan", 37, Path("checkpoints/x/last.ckpt"), 30)
    assert exited.value.code == 1
    assert capsys.readouterr().err == ("error: distill_finetune@nlvr2-dide: loss term 'soft' is nan at step 37; last "
                                       "good checkpoint kept at checkpoints/x/last.ckpt (step 30)\n")
    monkeypatch.setenv("DVC_STAGE", "distill_finetune@nlvr2-soft_attn_cross")  # what DVC calls the stage wins
    ckpt = Path("checkpoints/distill_finetune/nlvr2/soft_attn_cross/seed1/last.ckpt")  # the second replica's
    for rank, code in ((0, 130), (1, 0)):  # under DDP only rank 0 reports and fails (see faults.Interrupted)
        with pytest.raises(SystemExit) as exited:
            with stage_errors("distill_finetune@nlvr2-soft"):
                raise Interrupted(signal.SIGINT, 12, 32, ckpt, rank)
        assert exited.value.code == code
    assert capsys.readouterr().err == ("interrupted: distill_finetune@nlvr2-soft_attn_cross: SIGINT at step 12 of 32; "
                                       f"checkpoint saved to {ckpt}; rerun the stage (e.g. dvc repro) to resume "
                                       "from there\n")


# ----------------------------------------------------------------------------------------------- atomic writes
class _Halfway(RuntimeError):
    pass


def _write_half_then_fail(path, data: bytes = b"x" * 1000):
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    raise _Halfway("simulated crash mid-write")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_crash_mid_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"accuracy": 0.5})
    (tmp_path / "plain").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # as open() creates it, not mkstemp's 0600
    (tmp_path / "plain").unlink()
    with pytest.raises(_Halfway):
        with atomic_path(path) as tmp:
            _write_half_then_fail(tmp)
    assert json.loads(path.read_text()) == {"accuracy": 0.5} and _leftovers(tmp_path) == []


def test_curve_csv_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "curve.csv"
    write_curve(path, [{"step": 1, "loss": 0.5}])
    before = path.read_bytes()

    def fail(self, rows):
        self.writerow(rows[0])
        raise _Halfway("mid-write")

    monkeypatch.setattr(loop.csv.DictWriter, "writerows", fail)
    with pytest.raises(_Halfway):
        write_curve(path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_model_directory_crash_mid_save_keeps_the_previous_model(tmp_path, monkeypatch):
    """A model's ``save`` writes config.json, student.json, model.safetensors one after the other; through
    :func:`atomic_dir` a crash in the last one leaves the previous directory whole and loadable, and the replica of
    another seed beside it untouched."""
    from vldistill.models import dual
    from vldistill.models.teacher import ViltTeacher, vilt_config
    from vldistill.config import TeacherParams

    teacher = ViltTeacher(vilt_config(TeacherParams(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                                      48, 50), heads=("itm",))
    student = dual.DualEncoder.from_teacher(teacher, 16, task="nlvr2", num_outputs=2)
    out = tmp_path / "models/distill_finetune/nlvr2/dide/seed0"  # one seed's replica (paths.replica_dir)
    sibling = out.parent / "seed1"
    with atomic_dir(sibling) as tmp:
        student.save(tmp)
    with atomic_dir(out) as tmp:
        student.save(tmp)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    sibling_before = {p.name: p.read_bytes() for p in sibling.iterdir()}
    monkeypatch.setattr(dual, "save_file", lambda state, path: _write_half_then_fail(path))
    with torch.no_grad():
        student.fusion[0].weight.add_(1.0)
    with pytest.raises(_Halfway):
        with atomic_dir(out) as tmp:
            student.save(tmp)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(out.parent) == []
    dual.DualEncoder.load(out)
    # a writer killed outright (SIGKILL) leaves its temporary directory; the next write of that path removes it
    (out.parent / ".seed0.killed.tmpdir").mkdir()
    monkeypatch.undo()
    with atomic_dir(out) as tmp:
        student.save(tmp)
    assert _leftovers(out.parent) == [] and sorted(p.name for p in out.iterdir()) == sorted(before)
    assert {p.name: p.read_bytes() for p in sibling.iterdir()} == sibling_before
    assert sorted(p.name for p in out.parent.iterdir()) == ["seed0", "seed1"]
    assert torch.equal(load_file(out / "model.safetensors")["fusion.0.weight"], student.fusion[0].weight)


def test_checkpoint_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    fabric = Fabric(accelerator="cpu", devices=1)
    path = tmp_path / "last.ckpt"
    state = {"step": 3, "w": torch.ones(4)}
    loop._save_checkpoint(fabric, path, state, None)
    before = path.read_bytes()
    monkeypatch.setattr(fabric, "save", lambda tmp, obj: _write_half_then_fail(tmp))
    with pytest.raises(_Halfway):
        loop._save_checkpoint(fabric, path, {"step": 6, "w": torch.zeros(4)}, None)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_report_figure_crash_mid_write(tmp_path, monkeypatch):
    import pandas as pd
    from matplotlib.figure import Figure

    from vldistill.report.tables import plot_curves

    frames = {"dide": pd.DataFrame({"step": [1, 2], "loss": [0.7, 0.6], "dev_accuracy": [None, 0.5]})}
    out = plot_curves(frames, "accuracy", tmp_path / "nlvr2_curves.png", "nlvr2")
    before = out.read_bytes()
    assert before.startswith(b"\x89PNG")
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: _write_half_then_fail(path))
    with pytest.raises(_Halfway):
        plot_curves(frames, "accuracy", out, "nlvr2")
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------------------- tracking
def test_unreachable_tracking_server_costs_seconds_and_warns_once(monkeypatch, capfd):
    """Nothing listens on port 9: with MLflow's own defaults (7 retries, backoff factor 2) the first call would
    retry for minutes; here it fails within seconds, once, and every later call is a no-op."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for key in tracking.HTTP_FAST_FAIL:
        monkeypatch.delenv(key, raising=False)
    import mlflow  # noqa: F401 - imported before the clock starts

    start = time.perf_counter()
    with Tracker("teacher_finetune", {"a": 1}, task="nlvr2") as tracker:
        for step in range(20):
            tracker.log_metrics({"loss": 0.5}, step)
        tracker.log_artifact(__file__)
    elapsed = time.perf_counter() - start
    err = capfd.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("warning: MLflow")]
    assert len(ours) == 1, err
    assert ours[0].startswith("warning: MLflow (http://127.0.0.1:9): run and params not logged, tracking off for "
                              "the rest of this stage (")
    assert ours[0].endswith("); metrics files on disk are unaffected")
    assert elapsed < 10, elapsed
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_FAST_FAIL["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_a_users_mlflow_http_settings_are_kept(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with Tracker("tokenizer", {}):
        pass
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"


def test_an_sqlite_store_that_cannot_be_written_does_not_fail_the_stage(tmp_path, monkeypatch, capfd):
    """A store whose directory cannot be created (its parent is a file: fails as root too, unlike a chmod)."""
    (tmp_path / "not_a_dir").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'not_a_dir/mlflow.db'}")
    with Tracker("tokenizer", {"a": 1}) as tracker:
        tracker.log_metrics({"vocab_size": 100})
    ours = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: MLflow")]
    assert len(ours) == 1 and "run and params not logged" in ours[0], ours


def test_default_store_is_the_repository_root_also_for_queued_experiments(tmp_path, monkeypatch):
    """``dvc exp run --queue`` runs stages in a temporary copy under .dvc/tmp/exps and sets DVC_ROOT to the
    repository it was started in: the runs go to that repository's store, not to one deleted with the copy."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", "/repo")
    assert tracking.tracking_uri() == "sqlite:////repo/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.tracking_uri() == "http://tracking:5000"


def test_a_locked_sqlite_store_is_retried(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking._retry_locked(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        tracking._retry_locked(lambda: (_ for _ in ()).throw(ValueError("other")))


# ------------------------------------------------------------------------------------- end to end (real stages)
SEEDS = [0, 1]
"""``seeds`` of the tiny repository: distill_finetune@nlvr2-dide trains two replicas, one after the other."""


def _nlvr2_only_params() -> str:
    """The tiny params on nlvr2 alone, no ablation study, :data:`SEEDS`; distill_pretrain takes batches of 8 and each
    dide replica 2 epochs, so that each has 16 optimizer steps to be interrupted in."""
    params = yaml.safe_load(tiny_params_text())
    params["tasks"] = ["nlvr2"]
    params["runs"] = {key: run for key, run in params["runs"].items() if run["task"] == "nlvr2"}
    params["ablation"].update(tables={})
    params["seeds"] = SEEDS
    params["train"]["distill_pretrain"]["batch_size"] = 8
    params["train"]["distill_finetune_tasks"]["nlvr2"] = {"epochs": 2}
    return yaml.safe_dump(params, sort_keys=False)


STAGES = {  # DVC name: (command, model directory, metrics file, curve, resume checkpoint) of its last training run
    "teacher_finetune@nlvr2": (["stages/teacher_finetune.py", "--task", "nlvr2"], "models/teacher_finetune/nlvr2",
                               "metrics/train/teacher_finetune/nlvr2.json", "plots/train/teacher_finetune/nlvr2.csv",
                               "checkpoints/teacher_finetune/nlvr2/last.ckpt"),
    "distill_pretrain": (["stages/distill_pretrain.py"], "models/distill_pretrain",
                         "metrics/train/distill_pretrain/pretrain.json", "plots/train/distill_pretrain/pretrain.csv",
                         "checkpoints/distill_pretrain/last.ckpt"),
    "distill_finetune@nlvr2-dide": (["stages/distill_finetune.py", "--task", "nlvr2", "--variant", "dide"],
                                    "models/distill_finetune/nlvr2/dide/seed1",
                                    "metrics/train/distill_finetune/nlvr2/dide/seed1.json",
                                    "plots/train/distill_finetune/nlvr2/dide/seed1.csv",
                                    "checkpoints/distill_finetune/nlvr2/dide/seed1/last.ckpt"),
}
"""distill_finetune@nlvr2-dide: its second (last) replica, the one the tests interrupt; :data:`EARLIER` has the
first's."""
EARLIER = {  # DVC name: (model directory, metrics file, curve, resume checkpoint) of each earlier replica
    "distill_finetune@nlvr2-dide": [("models/distill_finetune/nlvr2/dide/seed0",
                                     "metrics/train/distill_finetune/nlvr2/dide/seed0.json",
                                     "plots/train/distill_finetune/nlvr2/dide/seed0.csv",
                                     "checkpoints/distill_finetune/nlvr2/dide/seed0/last.ckpt")],
}
CLEARED = {"distill_finetune@nlvr2-dide": "checkpoints/distill_finetune/nlvr2/dide"}
"""The checkpoint folder a finished stage removes, where it is not its resume checkpoint's folder (distill_finetune:
the variant's, holding one folder per seed, kept until the last replica is saved)."""


def _checkpoint_every(stage: str, n: int) -> list[str]:
    key = stage.split("@")[0]
    return ["-S", f"train.{key}.checkpoint_every={n}"]


def _outputs(repo: Path, stage: str) -> dict[str, bytes]:
    """Every byte a training stage writes: the model directory, metrics file and curve of its last training run and
    of each earlier replica."""
    return {**_run_outputs(repo, STAGES[stage][1:4]), **_earlier_outputs(repo, stage)}


def _earlier_outputs(repo: Path, stage: str) -> dict[str, bytes]:
    """The outputs of the stage's earlier replicas alone."""
    return {k: v for run in EARLIER.get(stage, []) for k, v in _run_outputs(repo, run[:3]).items()}


def _run_outputs(repo: Path, run: tuple[str, str, str]) -> dict[str, bytes]:
    model, metrics, curve = run
    files = [*sorted((repo / model).iterdir()), repo / metrics, repo / curve]
    return {str(f.relative_to(repo)): f.read_bytes() for f in files}


def _env() -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    return env


def _sh(args: list[str], repo: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


BUILD = """
import runpy, sys
for argv in [*(["stages/prepare.py", "--task", t] for t in ("pretrain", "nlvr2", "snli_ve", "vqa", "retrieval")),
             ["stages/tokenizer.py"], ["stages/teacher_pretrain.py"], ["stages/teacher_finetune.py", "--task", "nlvr2"],
             ["stages/distill_pretrain.py"], ["stages/distill_finetune.py", "--task", "nlvr2", "--variant", "dide"]]:
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""
"""What ``dvc repro distill_finetune@nlvr2-dide`` runs (the tokenizer reads every task's prepared train split), one
stage script after the other in a single interpreter: the same scripts and outputs, the imports paid once."""


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A git + DVC copy of the repository on :func:`_nlvr2_only_params` where distill_finetune@nlvr2-dide and every
    stage before it have run (:data:`BUILD`) and are recorded in dvc.lock (``dvc commit``) and committed, so that
    ``dvc exp run --queue`` has a baseline; and the outputs of those uninterrupted training runs (distill_finetune:
    both replicas)."""
    from test_pipeline import _copy_repo

    repo = tmp_path_factory.mktemp("faults") / "repo"
    _copy_repo(repo)
    (repo / "params.yaml").write_text(_nlvr2_only_params())
    env = _env()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.com"],
                ["git", "config", "user.name", "ci"], [sys.executable, "-c", BUILD],
                ["dvc", "commit", "-f", "--with-deps", "distill_finetune@nlvr2-dide"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "tiny"]):
        _sh(cmd, repo, env)
    assert not (repo / CLEARED["distill_finetune@nlvr2-dide"]).exists(), "a finished stage removes its checkpoints"
    return repo, env, {stage: _outputs(repo, stage) for stage in STAGES}


def _start(args: list[str], repo: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, *args], cwd=repo, env=env, stdout=fh, stderr=fh,
                                start_new_session=True, preexec_fn=_default_stop_signals)


def _default_stop_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM as a terminal's foreground job has them (a test run started in
    the background has SIGINT ignored, which the stage would keep)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def _wait_for(proc: subprocess.Popen, ready, what: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the stage ended (exit status {proc.returncode}) before {what}:\n" \
                                f"{log.read_text()[-3000:]}"


def _interrupt(stage: str, signum: int, repo: Path, env: dict, extra: list[str], after_resume: bool = False) -> str:
    """Run ``stage``; once the fit of its last training run is under way (that run's first step checkpoint is on
    disk, or it printed that it resumed from it) send ``signum``. The stage must end with 128 + signum having written
    none of that run's outputs; returns its log."""
    args, model, metrics, _, ckpt = STAGES[stage]
    log = repo / "interrupted.log"
    (repo / metrics).unlink(missing_ok=True)
    before = (repo / ckpt).stat().st_mtime_ns if (repo / ckpt).exists() else None
    proc = _start([*args, *extra], repo, env, log)
    if after_resume:
        _wait_for(proc, lambda: f"resuming from {ckpt} " in log.read_text(), "it resumed", log)
    else:
        _wait_for(proc, lambda: (repo / ckpt).exists() and (repo / ckpt).stat().st_mtime_ns != before,
                  "its first checkpoint", log)
    if signum == signal.SIGKILL:
        os.killpg(proc.pid, signum)  # as the OOM killer or a lost node would: no chance to clean up
    else:
        proc.send_signal(signum)
    code = proc.wait(timeout=240)
    text = log.read_text()
    assert code == (-signum if signum == signal.SIGKILL else 128 + signum), text[-3000:]
    assert (repo / ckpt).exists() and not (repo / metrics).exists()
    return text


def _resumes(stage: str, repo: Path, env: dict, extra: list[str]) -> str:
    """Rerun ``stage``: it must resume its last training run from that run's checkpoint and finish, removing its
    resume checkpoints; returns its console."""
    args, ckpt = STAGES[stage][0], STAGES[stage][4]
    out = _sh([sys.executable, *args, *extra], repo, env)
    assert _resumed_at(out.stdout, ckpt) is not None, out.stdout[-3000:]
    assert not (repo / ckpt).exists(), "a finished stage removes its resume checkpoint"
    assert not (repo / CLEARED.get(stage, Path(ckpt).parent)).exists(), "... and their folder"
    return out.stdout


def _resumed_at(text: str, ckpt: str) -> int | None:
    """The step the run of ``ckpt`` resumed at, as ``fit`` printed it (None: it did not resume from ``ckpt``)."""
    resumed = re.findall(rf"resuming from {re.escape(ckpt)} at epoch \d+, batch \d+ \(step (\d+)\)", text)
    assert len(resumed) <= 1, text[-3000:]
    return int(resumed[0]) if resumed else None


def _stop_line(text: str, stage: str, signum: int) -> re.Match:
    lines = [line for line in text.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1, text[-3000:]
    name = signal.Signals(signum).name
    ckpt = STAGES[stage][4]
    line = re.fullmatch(rf"interrupted: {re.escape(stage)}: {name} at step (\d+) of 16; checkpoint saved to "
                        rf"{re.escape(ckpt)}; rerun the stage \(e\.g\. dvc repro\) to resume from there", lines[0])
    assert line, lines[0]
    assert "Traceback" not in text, text[-3000:]
    return line


@pytest.mark.slow
def test_distill_pretrain_sigterm_checkpoints_and_rerun_ends_as_the_uninterrupted_run(tiny_repo):
    """SIGTERM (``kill``, SLURM) once fit is under way: the stage finishes the optimizer step, checkpoints it, says
    so in one line and exits 143; the rerun resumes at that step and writes what ``dvc repro`` wrote."""
    repo, env, reference = tiny_repo
    stage, extra = "distill_pretrain", _checkpoint_every("distill_pretrain", 4)
    text = _interrupt(stage, signal.SIGTERM, repo, env, extra)
    step = int(_stop_line(text, stage, signal.SIGTERM).group(1))
    assert step > 4
    assert _resumed_at(_resumes(stage, repo, env, extra), STAGES[stage][4]) == step
    assert _outputs(repo, stage) == reference[stage]


@pytest.mark.slow
def test_distill_finetune_killed_then_ctrl_c_then_rerun_ends_as_the_uninterrupted_run(tiny_repo):
    """The dide student (teacher targets, attention KD), two replicas (seeds 0 and 1) one after the other: SIGKILL
    after the second replica's step-4 checkpoint, the first one saved (model, metrics, curve as ``dvc repro`` wrote
    them) and its checkpoint kept. The rerun skips the first replica (resumed at its last step) and resumes the
    second at step 4, then gets SIGINT (Ctrl-C): exit 130, one line saying where that replica's checkpoint is. Its
    outputs removed as ``dvc repro`` removes them before it runs the stage, a second rerun makes the first
    replica's again from its kept checkpoint, resumes the second at the step it stopped at, writes exactly what
    ``dvc repro`` wrote and removes every checkpoint of the variant."""
    repo, env, reference = tiny_repo
    stage, extra = "distill_finetune@nlvr2-dide", _checkpoint_every("distill_finetune", 4)
    (first_model, first_metrics, first_curve, first_ckpt), = EARLIER[stage]
    earlier = {k: v for k, v in reference[stage].items() if k.startswith((first_model + "/", first_metrics,
                                                                          first_curve))}
    assert len(earlier) > 3 and earlier == _earlier_outputs(repo, stage)
    (repo / first_metrics).unlink()
    _interrupt(stage, signal.SIGKILL, repo, env, extra)
    assert _earlier_outputs(repo, stage) == earlier  # the first replica: trained again, saved, checkpoint kept
    finished = torch.load(repo / first_ckpt, map_location="cpu", weights_only=False)["step"]
    assert finished == 16
    text = _interrupt(stage, signal.SIGINT, repo, env, extra, after_resume=True)
    assert _resumed_at(text, first_ckpt) == finished and _resumed_at(text, STAGES[stage][4]) == 4
    step = int(_stop_line(text, stage, signal.SIGINT).group(1))
    assert step > 4
    assert _earlier_outputs(repo, stage) == earlier and (repo / first_ckpt).is_file()
    for path in (first_model, first_metrics, first_curve):  # what dvc repro removes before it runs the stage: its
        shutil.rmtree(repo / Path(path).parent)                # outputs, the variant's folders (every replica's)
    text = _resumes(stage, repo, env, extra)
    assert _resumed_at(text, first_ckpt) == finished and _resumed_at(text, STAGES[stage][4]) == step
    assert _outputs(repo, stage) == reference[stage]


@pytest.fixture(scope="module")
def second_run(tiny_repo):
    """teacher_finetune@nlvr2 run again, as it is (same params, same seed): its wall time."""
    repo, env, _ = tiny_repo
    start = time.perf_counter()
    _sh([sys.executable, *STAGES["teacher_finetune@nlvr2"][0]], repo, env)
    return time.perf_counter() - start


@pytest.mark.slow
def test_a_second_run_with_the_same_seed_writes_identical_outputs(tiny_repo, second_run):
    repo, _, reference = tiny_repo
    assert _outputs(repo, "teacher_finetune@nlvr2") == reference["teacher_finetune@nlvr2"]


@pytest.mark.slow
def test_unreachable_mlflow_neither_fails_nor_slows_the_stage(tiny_repo, second_run):
    """MLFLOW_TRACKING_URI names a server nobody listens on: the stage succeeds within seconds of a normal run,
    says once what was not logged, and its metrics files are those of the normal run."""
    repo, env, reference = tiny_repo
    stage = "teacher_finetune@nlvr2"
    start = time.perf_counter()
    out = _sh([sys.executable, *STAGES[stage][0]], repo, {**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    elapsed = time.perf_counter() - start
    warnings = [line for line in out.stderr.splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning: MLflow (http://127.0.0.1:9): run and params not logged, tracking off for the rest of this stage ("), \
        out.stderr[-3000:]
    assert _outputs(repo, stage) == reference[stage]
    assert elapsed < second_run + 15, (elapsed, second_run)


@pytest.mark.slow
def test_nan_loss_stops_the_stage_in_one_line_and_keeps_the_last_good_checkpoint(tiny_repo):
    """An absurd learning rate (1e30) blows the weights up within a step or two. The stage stops with one line naming
    the step and the loss terms (or the gradient) that were not finite, exit status 1; the checkpoint of the step
    before is kept with finite weights, and no output is (re)written."""
    repo, env, _ = tiny_repo
    stage = "teacher_finetune@nlvr2"
    args, model, metrics, curve, ckpt = STAGES[stage]
    outputs = [repo / model / "model.safetensors", repo / metrics, repo / curve]
    before = [p.stat().st_mtime_ns for p in outputs]
    out = subprocess.run([sys.executable, *args, "-S", "train.teacher_finetune.lr=1.0e+30",
                          *_checkpoint_every(stage, 1)], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = re.fullmatch(rf"error: {re.escape(stage)}: (loss terms? .+|gradient norm is nan or inf .+) at step (\d+); "
                        rf"last good checkpoint kept at {re.escape(ckpt)} \(step (\d+)\)", lines[0])
    assert line, lines[0]
    assert int(line.group(3)) == int(line.group(2)) - 1
    saved = torch.load(repo / ckpt, map_location="cpu", weights_only=False)
    assert saved["step"] == int(line.group(3))
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert [p.stat().st_mtime_ns for p in outputs] == before
    (repo / ckpt).unlink()


def _exp_metrics(shown, name: str) -> dict:
    """The metrics files of experiment ``name`` in ``dvc exp show --json`` output."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == name and isinstance(node.get("data"), dict):
                found.append(node["data"].get("metrics") or {})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    assert found, f"experiment {name} not in dvc exp show"
    return {path: entry.get("data", {}) for path, entry in found[0].items()}


@pytest.mark.slow
def test_two_queued_experiments_run_at_once_with_their_own_metrics_and_one_mlflow_store(tiny_repo):
    """``dvc exp run --queue`` twice (teacher_finetune@nlvr2 at batch 8 and 32) and ``dvc queue start -j 2``: two
    workers, each experiment in its own temporary copy, both writing to the repository's mlflow.db (DVC_ROOT): two
    FINISHED runs tagged with their experiment, each with its own batch size and step count (128 pairs / batch), and
    an intact sqlite file. Each experiment's metrics are its own. (Whether the two runs overlap in time depends on
    how fast the second worker starts; :func:`test_stages_starting_together_on_a_fresh_store_all_track` makes
    them.)"""
    repo, env, _ = tiny_repo
    batches = {"batch8": 8, "batch32": 32}
    (repo / "mlflow.db").unlink()  # both experiments open a fresh store: the case that used to break it for good
    for name, batch in batches.items():
        _sh(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.teacher_finetune.batch_size={batch}",
             "teacher_finetune@nlvr2"], repo, env)
    try:
        # Not _sh: the workers (forked by dvc-task, fds 1 and 2 inherited) hold a captured stdout pipe open until
        # they exit, so capturing it would wait for both experiments to finish, not for `dvc queue start`.
        with open(repo.parent / "queue-start.log", "w") as log:
            started = subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, timeout=120)
        assert started.returncode == 0, (repo.parent / "queue-start.log").read_text()[-3000:]
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline:
            status = _sh(["dvc", "queue", "status"], repo, env).stdout
            done = {name for name in batches for line in status.splitlines()
                    if re.search(rf"\b{name}\b", line) and re.search(r"Success|Failed", line)}
            if done == set(batches):
                break
            time.sleep(3)
        assert "Failed" not in status and done == set(batches), status + "".join(
            subprocess.run(["dvc", "queue", "logs", name], cwd=repo, env=env, capture_output=True,
                           text=True).stdout[-3000:] for name in batches)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=120)
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], repo, env).stdout)
    for name, batch in batches.items():
        metrics = _exp_metrics(shown, name)["metrics/train/teacher_finetune/nlvr2.json"]
        assert metrics["steps"] == 128 // batch and 0 <= metrics["dev_accuracy"] <= 1, (name, metrics)
    db = sqlite3.connect(repo / "mlflow.db")
    try:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        runs = {}
        for name, batch in batches.items():
            rows = db.execute("select r.run_uuid, r.status, r.start_time, r.end_time from runs r join tags t "
                              "on t.run_uuid = r.run_uuid where t.key = 'dvc_exp' and t.value = ?", (name,)).fetchall()
            assert len(rows) == 1, (name, rows)
            run, status, start, end = runs[name] = rows[0]
            assert status == "FINISHED"
            assert db.execute("select value from params where run_uuid = ? and key = ?",
                              (run, "train.teacher_finetune.batch_size")).fetchall() == [(str(batch),)]
            assert db.execute("select value from latest_metrics where run_uuid = ? and key = 'steps'",
                              (run,)).fetchall() == [(128 // batch,)]
    finally:
        db.close()


WRITER = """
import sys, time
from pathlib import Path
from vldistill.train.tracking import Tracker
import mlflow
Path(f"ready-{sys.argv[1]}").touch()
while not Path("go").exists():
    time.sleep(0.01)
with Tracker("teacher_finetune", {f"p{i}": i for i in range(100)}, task=sys.argv[1]) as tracker:
    for step in range(100):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
print("tracked" if tracker.enabled else "not tracked")
"""


@pytest.mark.slow
def test_stages_starting_together_on_a_fresh_store_all_track(tmp_path):
    """Three processes open one sqlite store that does not exist yet at the same moment (a file barrier), then each
    logs 100 params and 100 steps of 2 metrics. MLflow's table creation and migration race each other (before the
    lock in tracking.py every process lost its run and the store was left half-migrated, unusable for good); now all
    three runs are there, FINISHED, with every metric, and the database is intact."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for name in "abc"]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{name}").exists() for name in "abc") and time.monotonic() < deadline:
        time.sleep(0.05)  # every process past its imports: the store calls start together
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all("not tracked" not in out and "tracked" in out
                                                         for out in outputs), outputs
    db = sqlite3.connect(tmp_path / "mlflow.db")
    try:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        runs = db.execute("select r.name, r.status, count(m.key) from runs r left join metrics m "
                          "on m.run_uuid = r.run_uuid group by r.run_uuid order by r.name").fetchall()
    finally:
        db.close()
    assert runs == [(f"teacher_finetune/{name}", "FINISHED", 200) for name in "abc"]


DDP_NAN = '''
import sys
import torch
from lightning_fabric import Fabric
from test_fabric import _Noisy, _toy_split
from vldistill.cli import stage_errors
from vldistill.config import StageBudget
from vldistill.train.loop import fit


class NanOnRank1(_Noisy):
    def forward(self, batch):
        terms = super().forward(batch)
        if self.rank == 1 and self.calls == 5:  # forward call 5 = the first micro-batch of optimizer step 3
            terms = {"loss": terms["loss"] * float("nan"), "mse": terms["mse"] * float("nan")}
        return terms


fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
fabric.launch()
fabric.seed_everything(0, verbose=False)
model = NanOnRank1()
model.rank = fabric.global_rank
budget = StageBudget(epochs=2, batch_size=4, effective_batch=16, lr=0.05, log_every=4, checkpoint_every=1)
with stage_errors("toy"):
    fit(fabric, model, _toy_split(64).loader(4, True, 0, drop_last=True), lambda m: {"neg": 0.0}, budget, "neg",
        sys.argv[1], sys.argv[2], "fp", 0)
'''


@pytest.mark.slow
def test_a_nan_on_one_ddp_process_stops_every_process_at_the_same_step(tmp_path):
    """Two gloo processes; only rank 1 computes a NaN loss (step 3). Without agreement rank 0 would enter backward and
    wait for rank 1's gradients forever; with it both stop before that backward, rank 0 prints the one line naming
    the term and the process, and the checkpoint of step 2 is kept."""
    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_NAN)
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(tmp_path / "curve.csv")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: toy: loss term 'mse' is nan on process 1 at step 3; last good checkpoint kept at "
                     f"{tmp_path / 'ckpt' / 'last.ckpt'} (step 2)"], out.stderr[-3000:]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["step"] == 2
