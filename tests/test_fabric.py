"""The one Fabric loop: batch order and sharding (EpochBatches), resume by step, and, end to end on a training stage
(teacher_finetune@nlvr2, tiny): two DDP processes against one process with accumulation, a SIGKILL mid-epoch
followed by a rerun, with one process and with two, and the same stage command under torchrun and srun-style tasks.
Every student the same way on two processes: the fusion student with token_nce, distill_pretrain's dual student and
the dual DiDE student on nlvr2 and retrieval."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning_fabric import Fabric
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import TINY, tiny_params_text
from vldistill.config import StageBudget
from vldistill.data.datasets import EncodedSplit, EpochBatches, Indices
from vldistill.train.loop import fit, global_batch


def _toy_split(n: int, dim: int = 4) -> EncodedSplit:
    """``n`` examples ``x (dim,)`` with a linear target ``y``; no images."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(1))
    y = x @ torch.arange(1.0, dim + 1) + 0.5
    return EncodedSplit(columns={"x": x, "y": y}, images=torch.zeros(0, 1, 1, 3, dtype=torch.uint8),
                        pixel_norm="unit", texts=[""] * n)


def _epoch(loader: DataLoader, epoch: int, skip: int = 0) -> list[list[int]]:
    loader.batch_sampler.set_epoch(epoch, skip)
    return [batch["index"].tolist() for batch in loader]


# ------------------------------------------------------------------------------------------------- EpochBatches
def test_single_process_order_is_that_of_the_shuffling_dataloader_it_replaced():
    """``loader(b, shuffle=True, seed, drop_last=True)`` used to be a DataLoader over a RandomSampler whose generator
    fit reseeded to ``seed + epoch``. Its order is ``randperm(n)`` after one int64 draw from that generator (the
    DataLoader's worker base seed, drawn before the sampler shuffles), not ``randperm`` of the fresh generator."""
    n, b, seed = 50, 8, 3
    loader = _toy_split(n).loader(b, shuffle=True, seed=seed, drop_last=True)
    generator = torch.Generator().manual_seed(seed)
    old = DataLoader(Indices(n), batch_size=b, shuffle=True, drop_last=True, generator=generator)
    for epoch in range(3):
        generator.manual_seed(seed + epoch)
        expected = [batch.tolist() for batch in old]
        g = torch.Generator().manual_seed(seed + epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        perm = torch.randperm(n, generator=g).tolist()
        assert _epoch(loader, epoch) == expected == [perm[i * b:(i + 1) * b] for i in range(n // b)]
    assert len(loader) == n // b
    fresh = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    assert _epoch(loader, 0)[0] != fresh[:b]


def test_iterating_the_loader_leaves_the_global_torch_rng_alone():
    loader = _toy_split(20).loader(4, shuffle=True, seed=0, drop_last=True)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    _epoch(loader, 1)
    assert torch.equal(torch.get_rng_state(), before)


def test_unshuffled_loader_keeps_the_short_last_batch():
    loader = _toy_split(10).loader(4, shuffle=False, seed=0)
    assert [batch["index"].tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(loader) == 3


def test_shards_are_contiguous_slices_of_each_global_batch():
    """W=2 ranks × accumulate 2 × b=3: optimizer step k of rank r = order[12k + 6r : 12k + 6r + 6], as two batches;
    both ranks together = the 4 batches one process takes for step k with accumulate 4. The tail (n mod 12) is
    dropped on every rank, so both take the same number of steps."""
    n, b, world, acc = 50, 3, 2, 2
    ranks = []
    for rank in range(world):
        sampler = EpochBatches(n, b, shuffle=True, seed=5, drop_last=True)
        sampler.shard(rank, world, acc)
        sampler.set_epoch(2)
        ranks.append(list(sampler))
        assert len(sampler) == len(ranks[-1]) == (n // (b * acc * world)) * acc
    single = EpochBatches(n, b, shuffle=True, seed=5, drop_last=True)
    single.shard(0, 1, acc * world)
    single.set_epoch(2)
    order, one = single.order(), list(single)
    for step in range(n // (b * acc * world)):
        for rank in range(world):
            mine = sum(ranks[rank][step * acc:(step + 1) * acc], [])
            start = step * b * acc * world + rank * b * acc
            assert mine == order[start:start + b * acc]
        assert sum((sum(r[step * acc:(step + 1) * acc], []) for r in ranks), []) == \
            sum(one[step * acc * world:(step + 1) * acc * world], [])


def test_each_epoch_has_its_own_order_and_skip_resumes_inside_it():
    sampler = EpochBatches(40, 4, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(40)) and first != second
    sampler.set_epoch(0, skip=3)
    assert list(sampler) == first[3:] and len(sampler) == len(first) - 3
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_global_batch_names_the_batch_one_process_takes_in_its_place():
    """``fabric.seed_per_batch`` seeds batch i of rank r by :func:`global_batch`: the same examples' batch of one
    process accumulating over all ranks, so each batch draws the same whatever the number of processes."""
    n, b, world, acc = 50, 3, 2, 2
    single = EpochBatches(n, b, shuffle=True, seed=5, drop_last=True)
    single.shard(0, 1, acc * world)
    single.set_epoch(1)
    one = list(single)
    for rank in range(world):
        sampler = EpochBatches(n, b, shuffle=True, seed=5, drop_last=True)
        sampler.shard(rank, world, acc)
        sampler.set_epoch(1)
        for i, batch in enumerate(sampler):
            assert batch == one[global_batch(i, rank, world, acc)]
    assert [global_batch(i, 0, 1, 4) for i in range(8)] == list(range(8))


def test_sharding_over_processes_needs_drop_last():
    with pytest.raises(ValueError, match="drop_last"):
        EpochBatches(10, 2, shuffle=True, seed=0).shard(0, 2)
    with pytest.raises(ValueError, match="rank"):
        EpochBatches(10, 2, shuffle=True, seed=0, drop_last=True).shard(2, 2)


# --------------------------------------------------------------------------------------------- fit: resume by step
class _Noisy(torch.nn.Module):
    """A linear regressor whose loss draws from every stream a checkpoint restores: dropout (torch), ``random`` and
    numpy. ``crash_at``: raise on that forward call (a simulated kill)."""

    def __init__(self, dim: int = 4, crash_at: int | None = None):
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1)
        self.dropout = torch.nn.Dropout(0.3)
        self.crash_at, self.calls = crash_at, 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        pred = self.linear(self.dropout(batch["x"])).squeeze(-1)
        noise = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        mse = torch.nn.functional.mse_loss(pred, batch["y"]) * noise
        return {"loss": mse, "mse": mse.detach()}


def _fit(tmp: Path, split: EncodedSplit, crash_at: int | None = None):
    """``fit`` on the toy split: 64 examples, batch 4, effective 8 (accumulate 2) → 8 steps per epoch, 2 epochs;
    a checkpoint every 3 steps, a curve row every 4."""
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0, verbose=False)
    model = _Noisy(crash_at=crash_at)
    budget = StageBudget(epochs=2, batch_size=4, effective_batch=8, lr=0.05, log_every=4, checkpoint_every=3)
    dev = split.collate(list(range(16)))

    def evaluate(m) -> dict[str, float]:
        with torch.no_grad():
            return {"neg_mse": -float(torch.nn.functional.mse_loss(m.module.linear(dev["x"]).squeeze(-1), dev["y"]))}

    result = fit(fabric, model, split.loader(4, True, 0, drop_last=True), evaluate, budget, "neg_mse",
                 tmp / "ckpt", tmp / "curve.csv", "fp", 0)
    return result, model


def test_fit_resumed_mid_epoch_ends_exactly_as_an_uninterrupted_run(tmp_path, capsys):
    split = _toy_split(64)
    whole, whole_model = _fit(tmp_path / "whole", split)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "cut", split, crash_at=27)  # in step 14; last checkpoint: step 12 = epoch 1, batch 8
    saved = torch.load(tmp_path / "cut/ckpt/last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 8, 12)
    resumed, resumed_model = _fit(tmp_path / "cut", split)
    assert "resuming from" in capsys.readouterr().out
    assert resumed.steps == whole.steps == 16
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch
    for key, value in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    for key, value in whole.best_state.items():
        assert torch.equal(resumed.best_state[key], value), key
    assert (tmp_path / "cut/curve.csv").read_text() == (tmp_path / "whole/curve.csv").read_text()


def test_a_mid_epoch_checkpoint_of_another_process_count_is_ignored(tmp_path, capsys):
    split = _toy_split(64)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, split, crash_at=10)  # last checkpoint: epoch 0, after step 3 (batch 6)
    path = tmp_path / "ckpt/last.ckpt"
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "ranks": saved["ranks"] * 2}, path)  # as if written by two processes
    result, _ = _fit(tmp_path, split)
    out = capsys.readouterr().out
    assert "written mid-epoch by 2 processes, this run has 1" in out and "resuming" not in out
    assert result.steps == 16


def test_effective_batch_must_split_evenly_over_processes(tmp_path):
    """batch 4 on 2 processes = 8 examples per forward pass; effective 12 cannot be reached by accumulating them."""
    two_processes = SimpleNamespace(global_rank=0, world_size=2)
    budget = StageBudget(epochs=1, batch_size=4, effective_batch=12, lr=0.1)
    with pytest.raises(ValueError, match="must be a multiple of batch_size x processes = 4 x 2"):
        fit(two_processes, _Noisy(), _toy_split(32).loader(4, True, 0, drop_last=True), dict, budget, "x",
            tmp_path, tmp_path / "curve.csv", "fp", 0)


# ------------------------------------------------------------------------------------- end to end (a real stage)
FINETUNE = ["stages/teacher_finetune.py", "--task", "nlvr2", "-S", "train.teacher_finetune.batch_size=4",
            "-S", "train.teacher_finetune.effective_batch=8", "-S", "train.teacher_finetune.epochs=2",
            "-S", "train.teacher_finetune.checkpoint_every=5", "-S", "train.teacher_finetune.log_every=2"]
"""Tiny teacher fine-tuning: 8 pairs per optimizer step, 2 epochs (128 tiny pairs: 16 steps per epoch), a checkpoint
every 5 steps, mostly mid-epoch. teacher.dropout is 0 and the nlvr2 loss draws nothing random."""
STEPS = TINY["data"]["nlvr2"]["pairs"]["train"] // 8 * 2
DDP = ["-S", "fabric.devices=2", "-S", "fabric.strategy=ddp", "-S", "fabric.accelerator=cpu"]
PREPARE = """
import runpy, sys, yaml
tasks = yaml.safe_load(open("params.yaml"))["tasks"]
for argv in [*(["stages/prepare.py", "--task", t] for t in ("pretrain", *tasks)), ["stages/tokenizer.py"],
             ["stages/teacher_pretrain.py"]]:
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""
MODEL, METRICS, CURVE = ("models/teacher_finetune/nlvr2/model.safetensors", "metrics/train/teacher_finetune/nlvr2.json",
                         "plots/train/teacher_finetune/nlvr2.csv")
CKPT = "checkpoints/teacher_finetune/nlvr2/last.ckpt"


def _run(args: list[str], repo: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def _mlflow_runs(repo: Path) -> int:
    with sqlite3.connect(repo / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def _outputs(repo: Path) -> dict:
    return {"model": load_file(repo / MODEL), "metrics": json.loads((repo / METRICS).read_text()),
            "curve": (repo / CURVE).read_text()}


@pytest.fixture(scope="module")
def finetune_repo(tmp_path_factory):
    """A fresh copy of the repository on the tiny params with teacher_finetune's inputs, and the outputs of one
    uninterrupted single-process run of :data:`FINETUNE` there.

    The inputs are made as ``dvc repro teacher_pretrain`` makes them (prepare@pretrain, prepare@<task> for the
    enabled tasks, tokenizer, teacher_pretrain), by running those stage scripts one after the other in a single
    interpreter: the same scripts and outputs in half the time (the imports are paid once, no DVC)."""
    from test_pipeline import _copy_repo

    repo = tmp_path_factory.mktemp("fabric") / "repo"
    _copy_repo(repo)
    (repo / "params.yaml").write_text(tiny_params_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["-c", PREPARE], repo, env)
    _run(FINETUNE, repo, env)
    assert not (repo / CKPT).exists(), "a finished stage removes its resume checkpoint"
    return repo, env, _outputs(repo)


@pytest.fixture(scope="module")
def ddp_run(finetune_repo):
    """:data:`FINETUNE` on two DDP processes, uninterrupted: its outputs, its console text and the MLflow runs it
    added."""
    repo, env, _ = finetune_repo
    shutil.rmtree(repo / "checkpoints", ignore_errors=True)
    runs_before = _mlflow_runs(repo)
    out = _run([*FINETUNE, *DDP], repo, env)
    return _outputs(repo), out.stdout + out.stderr, _mlflow_runs(repo) - runs_before


def _kill_at_first_checkpoint(args: list[str], repo: Path, env: dict) -> None:
    """Start the stage, SIGKILL it (its whole process group: every DDP process) as soon as ``last.ckpt`` is on
    disk (written atomically, so it is whole), and check that it was killed mid-run."""
    shutil.rmtree(repo / "checkpoints", ignore_errors=True)
    for path in (MODEL, METRICS):
        (repo / path).unlink(missing_ok=True)
    log = repo / "killed.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, *args], cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + 240
        while not (repo / CKPT).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=60)
    assert code == -signal.SIGKILL, (f"the stage ended (exit status {code}) before it could be killed mid-run; if 0, "
                                     f"give it more steps (train.teacher_finetune.epochs):\n{log.read_text()[-2000:]}")
    assert (repo / CKPT).exists() and not (repo / METRICS).exists()


def _rerun_resumes_mid_epoch(args: list[str], repo: Path, env: dict) -> dict:
    out = _run(args, repo, env)
    resumed = re.search(r"resuming from \S+ at epoch (\d+), batch (\d+) \(step (\d+)\)", out.stdout)
    assert resumed, out.stdout[-2000:]
    assert int(resumed.group(2)) > 0, f"resumed from an epoch-end checkpoint, not mid-epoch: {resumed.group(0)}"
    return _outputs(repo)


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]
    assert a["model"].keys() == b["model"].keys()
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key


@pytest.mark.slow
def test_two_ddp_processes_take_the_steps_of_one_process_with_accumulation(finetune_repo, ddp_run):
    """``fabric.devices=2, strategy=ddp`` (two gloo processes, batch 4 each, effective 8: no accumulation) against
    one process (batch 4, effective 8: accumulation 2). Each optimizer step sees the same 8 examples, so the weights
    agree up to float32 summation order: atol 1e-5. Why that bound: the runs differ only in how per-example
    gradients are summed (DDP all-reduce vs accumulation), ~1e-7 relative; AdamW turns that into parameter
    differences of order 1e-7..1e-6 over 32 steps (measured: 6e-7 at most), while one step on different examples moves
    a parameter by about lr = 1e-3, a hundred times the bound."""
    _, _, reference = finetune_repo
    ddp, console, mlflow_runs = ddp_run
    assert "MEMBER: 2/2" in console and "distributed_backend=gloo" in console
    assert mlflow_runs == 1, "only rank 0 tracks"
    assert ddp["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, atol=1e-5, rtol=0, msg=key)
    assert ddp["metrics"]["steps"] == reference["metrics"]["steps"] == STEPS
    assert ddp["metrics"]["best_epoch"] == reference["metrics"]["best_epoch"]
    losses = [[float(row["loss"]) for row in csv.DictReader(io.StringIO(run["curve"])) if row["loss"]]
              for run in (ddp, reference)]
    assert len(losses[0]) == len(losses[1]) == STEPS // 2
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)  # logged loss = mean over both processes


@pytest.mark.slow
def test_the_stage_with_loader_workers_ends_as_the_stage_without(finetune_repo):
    """``data.loader.num_workers=2``: the batches are gathered in two worker processes instead of the training
    process, and the stage writes exactly the model, metrics and curve of the run without workers."""
    repo, env, reference = finetune_repo
    shutil.rmtree(repo / "checkpoints", ignore_errors=True)
    _run([*FINETUNE, "-S", "data.loader.num_workers=2"], repo, env)
    _assert_same_run(_outputs(repo), reference)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_ends_as_the_uninterrupted_run(finetune_repo):
    """Kill the stage with SIGKILL as soon as its first step checkpoint (after step 5 of 32) is on disk, rerun the
    same command: it resumes mid-epoch and writes exactly (bit for bit, CPU, same seed) the model, metrics and curve
    of the uninterrupted run."""
    repo, env, reference = finetune_repo
    _kill_at_first_checkpoint(FINETUNE, repo, env)
    _assert_same_run(_rerun_resumes_mid_epoch(FINETUNE, repo, env), reference)


@pytest.mark.slow
def test_ddp_killed_mid_epoch_then_rerun_ends_as_the_uninterrupted_ddp_run(finetune_repo, ddp_run):
    """The same with two DDP processes, both killed: each resumes its own data position, RNG states and unlogged
    loss sums (gathered into the checkpoint by rank 0), so model, metrics and curve equal the uninterrupted DDP run's
    bit for bit (gloo's two-process all-reduce sums in a fixed order)."""
    repo, env, _ = finetune_repo
    _kill_at_first_checkpoint([*FINETUNE, *DDP], repo, env)
    _assert_same_run(_rerun_resumes_mid_epoch([*FINETUNE, *DDP], repo, env), ddp_run[0])


ONE_SEED = ["-S", "seeds=[0]"]
"""One replica per distill_finetune run (the tiny params have two seeds): what the DDP tests compare is one run."""
NCE = ["stages/distill_finetune.py", "--task", "nlvr2", "--variant", "fusion_token_nce",
       "-S", "train.distill_finetune.batch_size=4", "-S", "train.distill_finetune.effective_batch=8",
       "-S", "train.distill_finetune_tasks.nlvr2.epochs=1", "-S", "distill.nce.queue_size=1024", *ONE_SEED]
"""The fusion student with ``token_nce`` on the tiny nlvr2 teacher (seed 0's replica): 16 optimizer steps of 8
pairs, each adding ~400 teacher token states (two image passes) to a queue of 1,024, which is full from the third
step on."""


@pytest.mark.slow
def test_token_nce_under_two_ddp_processes_takes_the_steps_of_one_process(finetune_repo):
    """``token_nce``'s FIFO queue of teacher token states takes each optimizer step's keys from every process in
    rank order (:func:`vldistill.train.loop.gather_rows`), so two gloo processes (batch 4 each) train the weights one
    process with accumulation 2 does; same bound and reason as the teacher's test above. (A queue of rank 0's keys
    only, as DDP's buffer broadcast alone would keep, gives every step different negatives.)"""
    repo, env, _ = finetune_repo
    model = repo / "models/distill_finetune/nlvr2/fusion_token_nce/seed0/model.safetensors"
    weights = []
    for processes in ([], DDP):
        shutil.rmtree(repo / "checkpoints", ignore_errors=True)
        _run([*NCE, *processes], repo, env)
        weights.append(load_file(model))
    one, two = weights
    assert one.keys() == two.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=0, msg=key)


# ------------------------------------------------------------------------ every student on two gloo processes
SAME_DRAWS = ["-S", "fabric.seed_per_batch=true"]
"""Losses that draw at random (distill_pretrain's masking and ITM negatives, retrieval's hard-negative tie breaks)
draw the same on any number of processes only with torch reseeded per batch (:func:`vldistill.train.loop.batch_seed`);
by default each process has its own stream."""
DISTILL_PRETRAIN = ["stages/distill_pretrain.py", "-S", "train.distill_pretrain.batch_size=4",
                    "-S", "train.distill_pretrain.effective_batch=8", *SAME_DRAWS]
"""The dual student's pre-training distillation: 128 tiny caption pairs, 16 optimizer steps of 8."""


def _distill_finetune(task: str) -> list[str]:
    """The main DiDE student (dual, from distill_pretrain) on ``task``, seed 0's replica, one epoch of optimizer steps
    of 8 examples: nlvr2 16 steps, retrieval 12."""
    return ["stages/distill_finetune.py", "--task", task, "--variant", "dide",
            "-S", "train.distill_finetune.batch_size=4", "-S", "train.distill_finetune.effective_batch=8",
            "-S", f"train.distill_finetune_tasks.{task}.epochs=1", *ONE_SEED]


def _two_then_one(repo: Path, env: dict, args: list[str], model: str, metrics: str) -> list[tuple[dict, dict, str]]:
    """``args`` on two DDP processes, then on one (whose model stays in place for the stages after): each run's
    weights (``<model>/model.safetensors``), metrics file and console."""
    runs = []
    for processes in (DDP, []):
        shutil.rmtree(repo / "checkpoints", ignore_errors=True)
        console = _run([*args, *processes], repo, env)
        runs.append((load_file(repo / model / "model.safetensors"), json.loads((repo / metrics).read_text()),
                     console.stdout + console.stderr))
    return runs


def _assert_two_processes_take_the_steps_of_one(runs: list[tuple[dict, dict, str]], near_zero: bool = False) -> None:
    """Every weight within atol 1e-5 (the teacher's test above says why), the same steps and best epoch.

    ``near_zero``: a run whose gradients are mostly cancellation noise (the tiny dual student's in-batch contrastive
    loss stays at ln 4 on retrieval: its embeddings barely differ, so every gradient is a sum of terms that nearly
    cancel, and the rounding of that sum depends on the summation order of one process vs two). AdamW divides by
    ``sqrt(v) + eps`` (eps 1e-8), so a gradient of rounding size (~1e-9) still moves its weight by ~lr/10 a step:
    measured 0.07 % of the weights beyond 1e-5, all within 5.2e-5 (attention key biases, whose gradient is zero up to
    rounding, and the projections). Then: at least 99 % of all weights within 1e-5 and every weight within 2e-4, five
    times below one AdamW step at the test's lr (1e-3); two processes that stepped on their own halves of the batch
    would differ by about an lr per step in almost every weight."""
    (two, two_metrics, console), (one, one_metrics, _) = runs
    assert "MEMBER: 2/2" in console
    assert two.keys() == one.keys()
    if not near_zero:
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, atol=1e-5, rtol=0, msg=key)
    else:
        diffs = {key: (two[key] - value).abs() for key, value in one.items()}
        beyond = sum(int((d > 1e-5).sum()) for d in diffs.values()) / sum(d.numel() for d in diffs.values())
        worst = max(diffs, key=lambda k: diffs[k].max())
        assert beyond < 0.01 and diffs[worst].max() < 2e-4, f"{beyond:.2%} beyond 1e-5; {worst}: {diffs[worst].max()}"
    assert two_metrics["steps"] == one_metrics["steps"] > 0 and two_metrics["best_epoch"] == one_metrics["best_epoch"]


@pytest.fixture(scope="module")
def distill_pretrain_runs(finetune_repo):
    repo, env, _ = finetune_repo
    return _two_then_one(repo, env, DISTILL_PRETRAIN, "models/distill_pretrain",
                         "metrics/train/distill_pretrain/pretrain.json")


@pytest.mark.slow
def test_distill_pretrain_under_two_ddp_processes_takes_the_steps_of_one_process(distill_pretrain_runs):
    """The dual student with ITC, ITM (+ teacher soft labels, cross-modal attention) and MLM: every head is used."""
    _assert_two_processes_take_the_steps_of_one(distill_pretrain_runs)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["nlvr2", "retrieval"])
def test_the_dual_student_fine_tunes_under_two_ddp_processes_as_on_one(finetune_repo, distill_pretrain_runs, task):
    """The main DiDE student on NLVR2 (task head; its ITM and ITC heads frozen) and on retrieval (ITC; its fusion MLP
    and ITM head frozen): DDP used to fail at the second step on those heads' missing gradients. NLVR2's loss draws
    nothing at random and runs on the default streams; retrieval's hard negatives break ties at random."""
    repo, env, _ = finetune_repo
    if not (repo / "models/teacher_finetune" / task / "model.safetensors").is_file():
        _run(["stages/teacher_finetune.py", "--task", task], repo, env)
    args = _distill_finetune(task) + (SAME_DRAWS if task == "retrieval" else [])
    runs = _two_then_one(repo, env, args, f"models/distill_finetune/{task}/dide/seed0",
                         f"metrics/train/distill_finetune/{task}/dide/seed0.json")
    assert runs[0][1]["seed"] == runs[1][1]["seed"] == 0
    assert not (repo / f"models/distill_finetune/{task}/dide/seed1").exists()  # one replica: seeds=[0]
    _assert_two_processes_take_the_steps_of_one(runs, near_zero=task == "retrieval")


# ------------------------------------------------------------------------------ launchers (README, "More than one GPU")
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _without_launcher_env(env: dict) -> dict:
    """``env`` without the variables by which Fabric recognises a launcher (torchrun's, SLURM's)."""
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "GROUP_", "ROLE_"))
            and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}


LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
             "fabric run": [str(Path(sys.executable).parent / "fabric"), "run", "--accelerator=cpu", "--devices=2",
                            "--strategy=ddp"]}
"""The venv python's arguments that launch the stage command after them (``fabric run`` is the venv's console
script, a python file; its flags must equal ``fabric.*``). torchrun and Fabric's own spawning give each of two
processes one thread here; ``fabric run`` sets ``OMP_NUM_THREADS`` to all the cores unless it is set, and a thread
count changes float32 summation order, so the test sets it to 1 for every launcher."""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_launcher_starts_the_processes_and_the_stage_joins_them(finetune_repo, ddp_run, launcher):
    """``torchrun --nproc_per_node=2`` / ``fabric run --devices=2`` around the unchanged stage command: Fabric joins
    the two processes the launcher started (TorchElasticEnvironment) instead of spawning its own, and the run is the
    Fabric-spawned DDP run bit for bit (same two gloo processes, same shards)."""
    repo, env, _ = finetune_repo
    shutil.rmtree(repo / "checkpoints", ignore_errors=True)
    out = _run([*LAUNCHERS[launcher], *FINETUNE, *DDP], repo, {**_without_launcher_env(env), "OMP_NUM_THREADS": "1"})
    assert "MEMBER: 2/2" in out.stdout + out.stderr
    _assert_same_run(_outputs(repo), ddp_run[0])


@pytest.mark.slow
def test_srun_style_tasks_are_joined_by_the_unchanged_stage(finetune_repo, ddp_run):
    """Two processes started the way ``srun --ntasks-per-node=2`` starts them (one per task, told their rank by
    ``SLURM_*`` variables, nothing else): Fabric's SLURMEnvironment joins them into the Fabric-spawned DDP run, bit
    for bit. (Only the environment is simulated; no SLURM is installed here.)"""
    repo, env, _ = finetune_repo
    shutil.rmtree(repo / "checkpoints", ignore_errors=True)
    slurm = {**_without_launcher_env(env), "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
             "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "vldistill", "SLURM_NODELIST": "localhost",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    logs = [repo / f"srun-task{rank}.log" for rank in (0, 1)]
    with contextlib.ExitStack() as files:
        tasks = [subprocess.Popen([sys.executable, *FINETUNE, *DDP], cwd=repo,
                                  stdout=files.enter_context(open(log, "w")), stderr=subprocess.STDOUT,
                                  env={**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
                 for rank, log in enumerate(logs)]
        codes = [task.wait(timeout=300) for task in tasks]
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    for rank, log in enumerate(logs):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in log.read_text()
    _assert_same_run(_outputs(repo), ddp_run[0])
