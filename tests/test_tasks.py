"""Per-task pieces: hard negatives, retrieval and VQA metrics, task heads of the students, the retrieval losses, and
the `runs` table of params.yaml."""

from __future__ import annotations

import pytest
import torch

from vldistill.config import ConfigError, DistillParams, StudentParams, TeacherParams, load
from vldistill.data.datasets import vqa_targets
from vldistill.distill.knowledge import KnowledgeModules
from vldistill.evaluate.metrics import recall_at_k, vqa_score
from vldistill.models.dual import DualEncoder
from vldistill.models.fusion import fusion_student
from vldistill.models.teacher import ViltTeacher, vilt_config
from vldistill.train import tasks
from vldistill.train.objectives import dide_loss, distill_pairs, retrieval_distill_loss, teacher_task_loss

from conftest import ROOT

B, T = 6, 7


@pytest.fixture(scope="module")
def teacher() -> ViltTeacher:
    torch.manual_seed(0)
    cfg = vilt_config(TeacherParams(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_text_len=T),
                      image_size=32, vocab_size=50)
    return ViltTeacher(cfg, heads=("retrieval",)).eval()


@pytest.fixture
def spread_teacher(teacher) -> ViltTeacher:
    """A copy of ``teacher`` whose rank head is scaled up: a random head scores every pair almost alike."""
    import copy

    spread = copy.deepcopy(teacher)
    with torch.no_grad():
        spread.rank_output.weight.mul_(300.0)
    return spread


def _retrieval_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (B, T), generator=g)
    ids[:, 0] = 2
    return {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
            "pixel_values": torch.rand(B, 3, 32, 32, generator=g), "image": torch.tensor([0, 0, 1, 2, 3, 4]),
            "index": torch.arange(B)}


def test_hard_negatives_never_pick_the_captions_own_image_and_prefer_shared_words():
    ids = torch.tensor([[1, 7, 8, 9], [1, 7, 8, 9], [1, 7, 8, 3], [1, 4, 5, 6], [1, 4, 5, 3]])
    images = torch.tensor([0, 0, 1, 2, 3])
    torch.manual_seed(0)
    negatives = tasks.hard_negatives(ids, torch.ones_like(ids), images, 2)
    assert negatives.shape == (5, 2)
    for row, picked in enumerate(negatives.tolist()):
        assert all(images[j] != images[row] for j in picked)
    assert negatives[0, 0] == 2  # "7 8" shared with caption 2, the most of any other image
    with pytest.raises(ValueError, match="retrieval_negatives"):
        tasks.hard_negatives(ids, torch.ones_like(ids), images, 5)


def test_hard_negatives_skip_copies_of_the_captions_own_text_until_nothing_else_is_left():
    """Caption 0's text is also caption 2's (another image): row 2 shares every word with it but describes image 0
    as truly as image 1, so it is not a negative of row 0 (nor row 0 of row 2) while other rows remain."""
    ids = torch.tensor([[1, 7, 8, 9], [1, 4, 5, 6], [1, 7, 8, 9], [1, 7, 8, 3], [1, 4, 5, 3]])
    images = torch.tensor([0, 1, 2, 3, 4])
    torch.manual_seed(0)
    negatives = tasks.hard_negatives(ids, torch.ones_like(ids), images, 3)
    assert 2 not in negatives[0].tolist() and 0 not in negatives[2].tolist()
    assert negatives[0, 0] == 3  # the most shared words of the rows left
    assert sorted(tasks.hard_negatives(ids, torch.ones_like(ids), images, 4)[0].tolist()) == [1, 2, 3, 4]
    padded = torch.tensor([[1, 7, 0], [1, 7, 3], [1, 7, 5]])  # what padding positions hold does not make texts differ
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]])
    assert tasks.hard_negatives(padded, mask, torch.tensor([0, 1, 2]), 1)[0].tolist() == [2]


def test_recall_at_k_on_a_hand_checked_matrix():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.1], [0.5, 0.6, 0.4], [0.1, 0.2, 0.3]])
    result = recall_at_k(scores, torch.tensor([0, 1, 2, 2]), ks=(1, 2))
    assert result["ir_r1"] == 0.75 and result["ir_r2"] == 0.75  # caption 2 ranks its image third
    assert result["tr_r1"] == 1.0  # every image's best caption is its own
    tied = recall_at_k(torch.zeros(2, 2), torch.tensor([0, 1]), ks=(1,))
    assert tied["ir_r1"] == 0.0  # ties count against the model


def test_recall_treats_copies_of_a_caption_as_one_text():
    """Images 0 and 1 both have the caption "one object" (rows 0 and 2); image 0 also "a red circle", image 1 "a blue
    square". A model that scores each text by what it sees gives copies equal scores: per caption the copy of image 1
    ties with image 0's, and counting it as wrong sends TR to 0; as one text, both images are described by it."""
    from vldistill.evaluate.metrics import same_text

    ids = torch.tensor([[2, 7, 8, 0], [2, 5, 6, 9], [2, 7, 8, 0], [2, 4, 3, 9]])
    mask = (ids != 0).long()
    text_image = torch.tensor([0, 0, 1, 1])
    groups = same_text(ids, mask)
    assert groups[0] == groups[2] and len(set(groups.tolist())) == 3
    scores = torch.tensor([[0.9, 0.9], [0.8, 0.1], [0.9, 0.9], [0.2, 0.7]])   # copies score alike
    as_rows = recall_at_k(scores, text_image, ks=(1,))
    assert as_rows["ir_r1"] == 0.5 and as_rows["tr_r1"] == 0.0  # each image's best caption ties with a "wrong" copy
    as_texts = recall_at_k(scores, text_image, groups, ks=(1,))
    assert as_texts["ir_r1"] == 1.0 and as_texts["tr_r1"] == 1.0
    wrong = torch.tensor([[0.9, 0.9], [0.1, 0.8], [0.9, 0.9], [0.7, 0.2]])   # the distinct captions swapped
    swapped = recall_at_k(wrong, text_image, groups, ks=(1,))
    assert swapped["ir_r1"] == 0.5 and swapped["tr_r1"] == 1.0  # "one object" still describes both images


def test_vqa_targets_and_score():
    import pandas as pd

    frame = pd.DataFrame({"answers": [["yes"], ["red", "blue"]], "scores": [[1.0], [0.6, 0.3]]})
    targets = vqa_targets(frame, ["yes", "no", "red", "blue"])
    assert torch.equal(targets[[0, 1]], torch.tensor([[1.0, 0, 0, 0], [0, 0, 0.6, 0.3]]))  # sparse, dense per row
    logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 9.0]])
    assert vqa_score(logits, targets) == pytest.approx((1.0 + 0.3) / 2)
    assert vqa_score(logits, targets) == vqa_score(logits, targets[[0, 1]])


@pytest.mark.parametrize("task,outputs", [("snli_ve", 3), ("vqa", 13), ("nlvr2", 2)])
def test_dual_encoder_task_heads_survive_save_and_load(teacher, task, outputs, tmp_path):
    student = DualEncoder.from_teacher(teacher, 24, task="pretrain").with_task(task, outputs)
    assert student.mlm_score is None
    student.save(tmp_path)
    loaded = DualEncoder.load(tmp_path).eval()
    batch = _retrieval_batch()
    if task == "nlvr2":
        out = loaded.nlvr2_logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                  batch["pixel_values"])
        ref = student.eval().nlvr2_logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                          batch["pixel_values"])
    else:
        out = loaded.classify(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        ref = student.eval().classify(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert out.shape == (B, outputs) and torch.allclose(out, ref)


def test_classification_distillation_runs_on_single_image_tasks(teacher):
    cfg = teacher.config
    snli = ViltTeacher(cfg, heads=("snli_ve",)).eval()
    student = DualEncoder.from_teacher(snli, 24, task="snli_ve", num_outputs=3)
    recipe = DistillParams(knowledge=["gt", "soft", "attn_cross"])
    pairs = distill_pairs(recipe, 2, 2)
    from vldistill.train.objectives import teacher_targets

    loss_fn = dide_loss(recipe, pairs, lambda b: teacher_targets(snli, b, [1], True))
    batch = _retrieval_batch() | {"labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    terms = loss_fn(student, batch)
    assert set(terms) == {"gt", "soft", "attn_cross", "loss"} and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert student.classifier[0].weight.grad is not None


@pytest.mark.parametrize("kind", ["dual", "fusion"])
def test_retrieval_distillation_terms_are_finite_and_only_train_the_student(teacher, kind):
    torch.manual_seed(0)
    knowledge = ["gt", "soft", "attn_cross"] if kind == "dual" else ["gt", "soft", "attn_mse", "token_nce"]
    recipe = DistillParams(knowledge=knowledge, layers="last")
    if kind == "dual":
        student = DualEncoder.from_teacher(teacher, 24, task="retrieval", num_outputs=1)
    else:
        student = fusion_student(teacher, StudentParams(kind="fusion", num_layers=1), heads=("retrieval",))
    pairs = distill_pairs(recipe, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    extras = KnowledgeModules(set(knowledge), pairs, 16, 16, 32, 0.07)
    terms = retrieval_distill_loss(recipe, pairs, teacher, 2, extras)(student, _retrieval_batch())
    assert set(terms) == {*knowledge, "loss"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_teacher_retrieval_loss_is_cross_entropy_over_candidates_in_both_directions(spread_teacher):
    """Reference: every (caption, image) pair scored alone with ``rank_score``; the loss is the mean of the CE of each
    caption over [its image, its negatives' images] and of each image over [its caption, its negatives' captions]."""
    import torch.nn.functional as F

    teacher = spread_teacher
    batch = _retrieval_batch()
    torch.manual_seed(0)
    cands = tasks.candidates(batch, 2)
    torch.manual_seed(0)  # the same random tie-breaks inside the loss
    loss = teacher_task_loss("retrieval", negatives=2)(teacher, batch)["loss"]
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with torch.no_grad():
        pair = lambda t, i: teacher.rank_score(ids[t:t + 1], mask[t:t + 1], pixels[i:i + 1])[0, 0]  # noqa: E731
        ir = torch.stack([torch.stack([pair(b, int(j)) for j in row]) for b, row in enumerate(cands)])
        tr = torch.stack([torch.stack([pair(int(j), b) for j in row]) for b, row in enumerate(cands)])
    positive = torch.zeros(B, dtype=torch.long)
    reference = (F.cross_entropy(ir, positive) + F.cross_entropy(tr, positive)) / 2
    assert torch.allclose(loss, reference, atol=1e-5)
    assert torch.equal(ir[:, 0], tr[:, 0]) and (ir[:, 1:] - tr[:, 1:]).abs().max() > 1e-3  # other pairs per image


def test_dual_retrieval_soft_labels_compare_both_directions(spread_teacher):
    """The dual student's ``soft`` term is the mean of the KL over candidate images per caption and over candidate
    captions per image, each against the teacher's rank scores of the same candidates."""
    from vldistill.distill import losses
    from vldistill.train.objectives import fusion_rank_outputs

    teacher = spread_teacher
    torch.manual_seed(0)
    student = DualEncoder.from_teacher(teacher, 24, task="retrieval", num_outputs=1).eval()
    batch = _retrieval_batch()
    recipe = DistillParams(knowledge=["soft"], temperature=2.0)
    torch.manual_seed(0)
    cands = tasks.candidates(batch, 2)
    torch.manual_seed(0)
    soft = retrieval_distill_loss(recipe, [(1, 1)], teacher, 2)(student, batch)["soft"]
    with torch.no_grad():
        target = fusion_rank_outputs(teacher, batch, cands, [], False)
        itc = student.itc_logits(student.encode_text(batch["input_ids"], batch["attention_mask"]).cls,
                                 student.encode_image(batch["pixel_values"], 1).cls)
    ir = losses.soft_labels(itc.gather(1, cands), target["scores"], 2.0)
    tr = losses.soft_labels(itc.T.gather(1, cands), target["scores_tr"], 2.0)
    assert torch.allclose(soft, (ir + tr) / 2, atol=1e-5) and not torch.allclose(soft, ir, atol=1e-4)


def test_runs_table_is_checked(tmp_path):
    params = load(ROOT / "params.yaml")
    assert params.task_variants("vqa") == ["dide", "dual_gt", "fusion_gt", "fusion_distillvlm"]
    assert params.student_kind("fusion_gt") == "fusion" and params.student_kind("dide") == "dual"
    with pytest.raises(ConfigError, match=r"unknown key 'variants\.dide_seed1\.seed'"):  # seeds are per run: seeds
        load(ROOT / "params.yaml", ["variants.dide_seed1={seed: 1}"])
    reseeded = load(ROOT / "params.yaml", ["seeds=[5, 2]"])
    assert reseeded.task_variants("vqa") == params.task_variants("vqa")  # seeds add replicas, not runs
    assert reseeded.task_models("vqa") == ["dide_seed5", "dide_seed2", "dual_gt_seed5", "dual_gt_seed2",
                                           "fusion_gt_seed5", "fusion_gt_seed2", "fusion_distillvlm_seed5",
                                           "fusion_distillvlm_seed2"]
    from vldistill import paths
    from vldistill.evaluate.run import lead_replica, models_for

    found = models_for("vqa", reseeded)  # what evaluate@vqa loads: the teacher, then every replica
    assert list(found) == ["teacher", *reseeded.task_models("vqa")]
    assert found["teacher"] == paths.model_dir("teacher_finetune", "vqa")
    assert found["fusion_gt_seed2"] == paths.replica_dir("vqa", "fusion_gt", 2)
    assert lead_replica(reseeded, "dual_gt") == "dual_gt_seed5"  # the first seed's replica stands for the variant
    with pytest.raises(ConfigError, match="runs"):
        load(ROOT / "params.yaml", ["runs.nlvr2-dide.variant=nope"])
    with pytest.raises(ConfigError, match="runs"):
        load(ROOT / "params.yaml", ["runs.vqa-dide.task=nlvr2"])


def test_vqa_head_of_a_released_checkpoint_is_remapped_to_the_prepared_answers(teacher):
    from vldistill.train.runs import remap_vqa_head

    cfg = teacher.config.__class__(**{**teacher.config.to_dict(), "id2label": {0: "no", 1: "red", 2: "yes"},
                                      "label2id": {"no": 0, "red": 1, "yes": 2}})
    model = ViltTeacher(cfg, heads=("vqa",)).eval()
    old = model.classifier[-1]
    remap_vqa_head(model, ["yes", "no", "circle"])
    new = model.classifier[-1]
    assert new.out_features == 3 and model.config.num_labels == 3
    assert torch.equal(new.weight[0], old.weight[2]) and torch.equal(new.weight[1], old.weight[0])
    assert torch.equal(new.bias[0], old.bias[2])


def test_report_recognises_seed_replicas():
    from vldistill.report.tables import label

    assert label("seed1") == "seed1" and label("dide") == "DiDE (distilled dual encoder)"
    assert label("dual_gt_seed1") == "Dual encoder, ground-truth labels only (seed 1)"
