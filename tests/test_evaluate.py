"""Evaluation on a device, sharded over processes, and the re-ranked retrieval of fusion models.

- One process on the CPU in float32 computes exactly (bit for bit) what the evaluation computed before it could run
  elsewhere: the old code's arithmetic is written out here and compared.
- Two gloo processes compute the metrics of one process (each unit of work is computed as one process computes it,
  so exactly), the same on both ranks.
- ``evaluate.rerank_k``: with k = every image and caption the re-ranked recalls are the full ranking's; with a small
  k the fusion model scores at most N·k pairs per direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vldistill.config import ConfigError, StudentParams, TeacherParams, load
from vldistill.data.datasets import EncodedSplit, to_pixels
from vldistill.evaluate import metrics as M
from vldistill.evaluate.predictions import records
from vldistill.models.dual import DualEncoder
from vldistill.models.fusion import fusion_student
from vldistill.models.teacher import ViltTeacher, vilt_config

from conftest import ROOT

T, SIZE, VOCAB = 6, 32, 40
OUTPUTS = {"nlvr2": 2, "snli_ve": 3, "vqa": 5}


def tiny_teacher(task: str) -> ViltTeacher:
    torch.manual_seed(0)
    cfg = vilt_config(TeacherParams(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_text_len=T),
                      image_size=SIZE, vocab_size=VOCAB)
    cfg.num_labels = OUTPUTS.get(task, 2)
    teacher = ViltTeacher(cfg, heads=(task,))
    if task == "retrieval":
        with torch.no_grad():  # a random rank head scores every pair almost alike: spread the scores
            teacher.rank_output.weight.mul_(300.0)
    return teacher.eval()


def tiny_models(task: str) -> dict[str, torch.nn.Module]:
    """The three kinds of model evaluated: the fusion teacher, a dual student, a small fusion student."""
    teacher = tiny_teacher(task)
    torch.manual_seed(1)
    dual = DualEncoder.from_teacher(teacher, 16, task=task, num_outputs=1 if task == "retrieval" else OUTPUTS[task])
    fusion = fusion_student(teacher, StudentParams(kind="fusion"), heads=(task,))
    return {"teacher": teacher, "dual": dual.eval(), "fusion": fusion.eval()}


def tiny_split(task: str, n: int = 21, images: int = 9, seed: int = 0) -> EncodedSplit:
    """An in-memory split of ``n`` examples over ``images`` random images (retrieval: 3 captions per image, two of
    them the same text on different images, as generated data has)."""
    g = torch.Generator().manual_seed(seed)
    if task == "retrieval":
        n = 3 * images
    ids = torch.randint(5, VOCAB, (n, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::4, -2:] = 0
    columns = {"input_ids": ids, "attention_mask": mask}
    if task == "retrieval":
        columns["image"] = torch.arange(images).repeat_interleave(3)
        ids[3] = ids[0]  # caption 3 (image 1) has the text of caption 0 (image 0)
    elif task == "nlvr2":
        columns["image_left"] = torch.randint(images, (n,), generator=g)
        columns["image_right"] = torch.randint(images, (n,), generator=g)
        columns["labels"] = torch.randint(2, (n,), generator=g)
    else:
        columns["image"] = torch.randint(images, (n,), generator=g)
        if task == "vqa":
            columns["targets"] = torch.rand(n, OUTPUTS["vqa"], generator=g).mul(3).floor().div(3)
        else:
            columns["labels"] = torch.randint(3, (n,), generator=g)
    store = torch.randint(0, 256, (images, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    return EncodedSplit(columns=columns, images=store, pixel_norm="unit", texts=[f"t{i}" for i in range(n)])


# ------------------------------------------------------------------------------------------- the old arithmetic
@torch.no_grad()
def old_class_metric(model, split, task: str, batch_size: int) -> float:
    """Classification as evaluate/metrics.py computed it: every batch on the CPU, logits concatenated."""
    fn = M.class_logits_fn(model, task)
    logits = torch.cat([fn(b).float() for b in split.loader(batch_size, shuffle=False, seed=0)])
    if task == "vqa":
        return M.vqa_score(logits, split.columns["targets"])
    return M.accuracy(logits, split.columns["labels"])


@torch.no_grad()
def old_retrieval_scores(model, split, batch_size: int) -> torch.Tensor:
    """Retrieval scores as evaluate/metrics.py computed them: the dual encoder's matrix from chunks of captions and
    images; a fusion model on chunks of captions, each repeated against every image."""
    rows, keys, _ = M.gallery(split)
    ids, mask = split.columns["input_ids"][rows], split.columns["attention_mask"][rows]
    pixels = lambda k: to_pixels(split.images[k], split.pixel_norm)  # noqa: E731
    if hasattr(model, "itc_logits"):
        texts = torch.cat([model.encode_text(ids[i:i + batch_size], mask[i:i + batch_size]).cls
                           for i in range(0, len(rows), batch_size)])
        images = torch.cat([model.encode_image(pixels(keys[i:i + batch_size])).cls
                            for i in range(0, len(keys), batch_size)])
        return model.itc_logits(texts, images).float()
    per_chunk = max(1, batch_size // len(keys))
    image_pixels = pixels(keys)
    chunks = []
    for i in range(0, len(rows), per_chunk):
        n = min(per_chunk, len(rows) - i)
        out = model.rank_score(ids[i:i + n].repeat_interleave(len(keys), 0),
                               mask[i:i + n].repeat_interleave(len(keys), 0), image_pixels.repeat(n, 1, 1, 1))
        chunks.append(out.view(n, len(keys)).float())
    return torch.cat(chunks)


@pytest.mark.parametrize("task", ["nlvr2", "snli_ve", "vqa"])
@pytest.mark.parametrize("batch_size", [4, 256])
def test_one_cpu_process_classifies_bit_for_bit_as_before(task, batch_size):
    split = tiny_split(task)
    for name, model in tiny_models(task).items():
        metric = "vqa_score" if task == "vqa" else "accuracy"
        new = M.classification_metrics(model, split, task, batch_size)
        assert new == {metric: old_class_metric(model, split, task, batch_size)}, name
        assert not model.training


@pytest.mark.parametrize("batch_size", [5, 256])
def test_one_cpu_process_scores_retrieval_bit_for_bit_as_before(batch_size):
    split = tiny_split("retrieval")
    for name, model in tiny_models("retrieval").items():
        scores = M.retrieval_scores(model, split, batch_size=batch_size)
        old = old_retrieval_scores(model, split, batch_size)
        assert torch.equal(scores.ir, old) and torch.equal(scores.tr, old), name
        rows, _, text_image = M.gallery(split)
        groups = M.same_text(split.columns["input_ids"][rows], split.columns["attention_mask"][rows])
        assert scores.recall() == M.recall_at_k(old, text_image, groups), name
        assert scores.pairs_scored == (0 if name == "dual" else old.numel())


def test_predictions_come_from_the_same_outputs_as_the_metrics():
    split = tiny_split("snli_ve")
    model = tiny_models("snli_ve")["teacher"]
    outputs = M.class_outputs(model, split, "snli_ve", 4)
    logits = torch.cat([model.classify(b["input_ids"], b["attention_mask"], b["pixel_values"])
                        for b in split.loader(256, shuffle=False, seed=0)]).detach()
    assert records(outputs, split, "snli_ve") == [{"example": i, "label": int(c)}
                                                  for i, c in enumerate(logits.argmax(-1))]


# ---------------------------------------------------------------------------------------------------- re-ranking
class Counting(torch.nn.Module):
    """A fusion model that counts the (caption, image) pairs it scores."""

    def __init__(self, model):
        super().__init__()
        self.model, self.pairs = model, 0

    def rank_score(self, ids, mask, pixels):
        self.pairs += len(ids)
        return self.model.rank_score(ids, mask, pixels)


def test_rerank_with_every_candidate_is_the_full_ranking_and_small_k_costs_n_k_per_direction():
    split = tiny_split("retrieval", images=9)  # 27 captions x 9 images
    models = tiny_models("retrieval")
    dual = M.retrieval_scores(models["dual"], split)
    n_text, n_image = dual.ir.shape
    for name in ("teacher", "fusion"):
        full = M.retrieval_scores(models[name], split, batch_size=7)
        everything = M.retrieval_scores(models[name], split, batch_size=7,
                                        candidates=M.rerank_candidates(dual, max(n_text, n_image)))
        assert torch.equal(everything.ir, full.ir) and torch.equal(everything.tr, full.tr)
        assert everything.recall() == full.recall() and everything.pairs_scored == n_text * n_image

        k = 2
        counting = Counting(models[name])
        candidates = M.rerank_candidates(dual, k)
        assert candidates[..., 0].sum(dim=1).eq(k).all() and candidates[..., 1].sum(dim=0).eq(k).all()
        reranked = M.retrieval_scores(counting, split, batch_size=7, candidates=candidates)
        assert counting.pairs == reranked.pairs_scored <= n_text * k + n_image * k
        assert reranked.pairs_scored >= max(n_text, n_image) * k
        # a candidate keeps its fusion score (up to the float noise of other pass sizes), every other pair ranks below
        ir, tr = candidates[..., 0], candidates[..., 1]
        torch.testing.assert_close(reranked.ir[ir], full.ir[ir], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reranked.tr[tr], full.tr[tr], rtol=1e-5, atol=1e-5)
        assert reranked.ir[~ir].eq(float("-inf")).all() and reranked.tr[~tr].eq(float("-inf")).all()
        # the caption's own image outside its top-k: a miss at R@1, whatever the fusion model thinks
        recall = reranked.recall(ks=(1,))
        own = candidates[torch.arange(n_text), dual.text_image, 0]
        assert recall["ir_r1"] <= own.float().mean().item()


def test_rerank_knobs_are_checked():
    good = load(ROOT / "params.yaml", ["evaluate.rerank_k=16"])
    assert good.evaluate.rerank_k == 16 and good.evaluate.rerank_with == "dide"
    with pytest.raises(ConfigError, match=r"evaluate.rerank_k=0: .*greater than or equal to 1"):
        load(ROOT / "params.yaml", ["evaluate.rerank_k=0"])
    with pytest.raises(ConfigError, match=r"evaluate.rerank_with=\"fusion_gt\": must be a dual-encoder student"):
        load(ROOT / "params.yaml", ["evaluate.rerank_k=16", "evaluate.rerank_with=fusion_gt"])
    with pytest.raises(ConfigError, match=r"evaluate.rerank_with=\"soft\": .*runs trains on retrieval"):
        load(ROOT / "params.yaml", ["evaluate.rerank_k=16", "evaluate.rerank_with=soft"])
    assert load(ROOT / "params.yaml").evaluate.rerank_k is None  # the embedded default: the exact full ranking
    paper = load(ROOT / "params.paper.yaml").evaluate
    assert paper.rerank_k is not None and paper.rerank_k >= 10  # recall@10 needs 10 candidates


# ------------------------------------------------------------------------------------------- two gloo processes
def _evaluate_on_ranks(fabric, out: str) -> None:
    """Every metric of :func:`_all_metrics` on this process, written to ``<out>/rank<r>.json``."""
    torch.set_num_threads(1)
    Path(out, f"rank{fabric.global_rank}.json").write_text(json.dumps(_all_metrics(fabric)))


def _all_metrics(fabric) -> dict:
    """Classification with several batches per process and with one batch for two processes (one computes it and
    keeps nothing), retrieval of the dual encoder and of the fusion teacher (full and re-ranked), the dev metric of
    training; and a digest of the scores."""
    results = {}
    for task in ("nlvr2", "vqa"):
        split, models = tiny_split(task), tiny_models(task)
        for batch_size in (4, 256):
            for name in ("teacher", "dual"):
                results[f"{task}/{name}/b{batch_size}"] = M.classification_metrics(models[name], split, task,
                                                                                   batch_size, fabric)
    split, models = tiny_split("retrieval"), tiny_models("retrieval")
    dual = M.retrieval_scores(models["dual"], split, batch_size=4, fabric=fabric)
    results["retrieval/dual"] = dual.recall()
    results["retrieval/dual/sum"] = float(dual.ir.double().sum())
    for k in (None, 3):
        candidates = None if k is None else M.rerank_candidates(dual, k)
        scores = M.retrieval_scores(models["teacher"], split, batch_size=12, fabric=fabric, candidates=candidates)
        results[f"retrieval/teacher/k{k}"] = scores.recall()
        results[f"retrieval/teacher/k{k}/sum"] = float(scores.ir.masked_fill(scores.ir.isinf(), 0).double().sum())
    results["retrieval/dev"] = M.task_metrics(models["fusion"], split, "retrieval", fabric, captions_per_image=1)
    return results


def test_two_gloo_processes_compute_the_metrics_of_one_process_on_every_rank(tmp_path):
    from lightning_fabric import Fabric

    reference = _all_metrics(None)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(_evaluate_on_ranks, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == reference


# ------------------------------------------------------------------------------------------------- the report
def test_the_ranking_of_each_retrieval_model_is_recorded_and_reported(tmp_path):
    """Fusion models are re-ranked by the first seed's replica of ``evaluate.rerank_with``; the report's line names a
    student once when all its replicas were ranked alike, else each replica."""
    from vldistill import paths
    from vldistill.evaluate.run import lead_replica, models_for, ranking
    from vldistill.report import tables

    params = load(ROOT / "params.yaml")
    reranked = load(ROOT / "params.yaml", ["evaluate.rerank_k=16"])
    assert ranking("teacher", False, params) == ranking("dide_seed0", True, reranked) == "full"
    assert ranking("fusion_gt_seed1", False, reranked) == "rerank@16 by dide_seed0"
    later = load(ROOT / "params.yaml", ["evaluate.rerank_k=16", "seeds=[3, 1]"])
    assert lead_replica(later, "dide") == "dide_seed3"  # the first seed listed, not the smallest
    assert ranking("fusion_gt_seed1", False, later) == "rerank@16 by dide_seed3"
    assert list(models_for("retrieval", later)) == ["teacher", *later.task_models("retrieval")]
    assert [m for m in models_for("retrieval", later) if m.startswith("dide")] == ["dide_seed3", "dide_seed1"]
    assert models_for("retrieval", later)["dide_seed1"] == paths.replica_dir("retrieval", "dide", 1)
    assert tmp_path / paths.eval_ranking("retrieval") == tmp_path / "metrics" / tables.RANKING
    models, seeds = ["teacher", "dide", "fusion_gt"], [0, 1]
    assert "missing: " in tables.retrieval_ranking(tmp_path / "metrics", models, seeds)
    path = tmp_path / paths.eval_ranking("retrieval")
    path.parent.mkdir(parents=True)
    full = {"ranking": "full", "pairs_scored": {"test": 0}, "pairs_total": {"test": 5000}}
    path.write_text(json.dumps({
        "teacher": {"ranking": "rerank@16 by dide_seed0", "pairs_scored": {"test": 1234},
                    "pairs_total": {"test": 5000}},
        "dide_seed0": full, "dide_seed1": full,
        "fusion_gt_seed0": {"ranking": "rerank@16 by dide_seed0", "pairs_scored": {"test": 987},
                            "pairs_total": {"test": 5000}}}))  # fusion_gt_seed1: not recorded
    line = tables.retrieval_ranking(tmp_path / "metrics", models, seeds)
    assert f"{tables.label('teacher')}: re-ranked: the fusion model scores the top-16 candidates of " \
           f"{tables.label('dide_seed0')}'s similarities" in line and "(1,234 of 5,000 test pairs" in line
    assert f"{tables.label('dide')}: full ranking" in line  # both replicas alike: named once, without a seed
    assert f"{tables.label('dide_seed1')}" not in line
    assert f"{tables.label('fusion_gt_seed0')}: re-ranked: " in line and "(987 of 5,000 test pairs" in line
    assert f"{tables.label('fusion_gt_seed1')}: not recorded" in line
