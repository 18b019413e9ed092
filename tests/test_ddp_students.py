"""Every student trains under DDP: whatever the student kind, task and recipe, each parameter left trainable gets a
gradient from the stage's loss, and the ones frozen are exactly those the loss never reads (DDP fails at the second
optimizer step on a trainable parameter without a gradient). One process, no DDP: the objectives are built as the
stages build them (:func:`objectives.distill_finetune_objective`, :func:`objectives.distill_pretrain_objective`)."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from vldistill.config import ConfigError, StudentParams, TeacherParams, load
from vldistill.models.dual import DualEncoder
from vldistill.models.fusion import fusion_student
from vldistill.models.teacher import ViltTeacher, vilt_config
from vldistill.train import objectives
from vldistill.train.runs import _teacher_fn

B, T, VOCAB, ANSWERS = 6, 7, 50, 5
PARAMS = load(ROOT / "params.yaml")
TASKS = ("nlvr2", "snli_ve", "vqa", "retrieval")
RECIPES = list({(PARAMS.student_kind(v), PARAMS.variant(v).model_dump_json()): v for v in sorted(PARAMS.variants,
                                                                                                  reverse=True)}.values())
"""One variant of params.yaml per distinct (student kind, recipe): every knowledge set, layer choice and stages."""


def _teacher(heads: tuple[str, ...], frozen: bool = True) -> ViltTeacher:
    """A tiny ViLT with ``heads``: frozen in eval mode as the teacher a stage distills from, or trainable as the
    pre-trained teacher a student is copied from."""
    cfg = vilt_config(TeacherParams(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_text_len=T),
                      image_size=32, vocab_size=VOCAB)
    cfg.num_labels = ANSWERS
    model = ViltTeacher(cfg, heads=heads)
    return model.eval().requires_grad_(False) if frozen else model


def _batch(task: str) -> dict[str, torch.Tensor]:
    """A batch as :meth:`EncodedSplit.collate` makes it for ``task`` (``pretrain``: image–caption pairs)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (B, T), generator=g)
    ids[:, 0] = 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -2:] = 0
    batch = {"index": torch.arange(B), "input_ids": ids, "attention_mask": mask}
    pixels = lambda: torch.rand(B, 3, 32, 32, generator=g)  # noqa: E731
    if task == "nlvr2":
        return batch | {"pixel_values_left": pixels(), "pixel_values_right": pixels(), "labels": torch.arange(B) % 2}
    batch |= {"pixel_values": pixels(), "image": torch.tensor([0, 0, 1, 2, 3, 4])}
    if task == "snli_ve":
        return batch | {"labels": torch.arange(B) % 3}
    if task == "vqa":
        return batch | {"targets": torch.rand(B, ANSWERS, generator=g)}
    return batch


def _finetune_student(task: str, variant: str):
    """The student ``runs._finetune_student`` starts ``variant`` from, built on a tiny pre-trained teacher."""
    outputs = {"nlvr2": 2, "snli_ve": 3, "vqa": ANSWERS, "retrieval": 1}[task]
    pretrained = _teacher(("mlm", "itm"), frozen=False)
    if PARAMS.student_kind(variant) == "fusion":
        return fusion_student(pretrained, StudentParams(kind="fusion"), heads=(task,))
    if "pretrain" in PARAMS.variant(variant).stages:  # from distill_pretrain's student, with a fresh task head
        return DualEncoder.from_teacher(pretrained, 16, task="pretrain").with_task(task, outputs)
    return DualEncoder.from_teacher(pretrained, 16, task=task, num_outputs=outputs)


def _gradients(objective: torch.nn.Module, batch: dict) -> tuple[set[str], set[str]]:
    """One forward/backward of ``objective``: (names of its trainable parameters, names of those with a gradient)."""
    objective.zero_grad(set_to_none=True)
    objective.train()
    objective(batch)["loss"].backward()
    params = dict(objective.named_parameters())
    return ({n for n, p in params.items() if p.requires_grad}, {n for n, p in params.items() if p.grad is not None})


def _assert_trains_exactly_what_its_loss_reads(objective: torch.nn.Module, batch: dict) -> set[str]:
    trainable, with_grad = _gradients(objective, batch)
    assert trainable - with_grad == set(), "trainable, but no gradient (DDP fails on these)"
    frozen = {n for n, _ in objective.named_parameters()} - trainable
    objective.requires_grad_(True)
    everything, used = _gradients(objective, batch)
    assert frozen == everything - used, "frozen parameters must be exactly the ones the loss never reads"
    return frozen


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", sorted(RECIPES))
def test_distill_finetune_trains_every_parameter_it_leaves_trainable(task, variant):
    """Every variant of params.yaml (both student kinds, every knowledge set, both layer choices) on every task."""
    torch.manual_seed(0)
    teacher = _teacher((task,))
    recipe = PARAMS.variant(variant)
    live = recipe.model_copy(update={"cache_teacher": False})  # same targets as the cache, from the live teacher
    objective = objectives.distill_finetune_objective(
        recipe, task, _finetune_student(task, variant), teacher, 2,
        lambda layers: _teacher_fn(live, teacher, None, layers, torch.device("cpu")))
    frozen = _assert_trains_exactly_what_its_loss_reads(objective, _batch(task))
    if PARAMS.student_kind(variant) == "dual":
        assert frozen, "a dual student always has heads its fine-tuning task does not read"


def test_distill_pretrain_trains_every_parameter_it_leaves_trainable():
    torch.manual_seed(0)
    teacher = _teacher(("mlm", "itm"))
    student = DualEncoder.from_teacher(_teacher(("mlm", "itm"), frozen=False), 16, task="pretrain")
    masker = lambda ids, mask: objectives.mask_tokens(ids, mask, 4, VOCAB, [0, 1, 2, 3, 4])  # noqa: E731
    objective = objectives.distill_pretrain_objective(PARAMS.distill, student, teacher, masker)
    assert _assert_trains_exactly_what_its_loss_reads(objective, _batch("pretrain")) == set()


def test_a_recipe_without_a_term_on_the_task_outputs_is_refused():
    """Without ``gt`` or ``soft`` the head (and whatever lies above the distilled layers) never gets a gradient."""
    with pytest.raises(ConfigError, match=r"variants.dide.knowledge.*add 'gt' or 'soft'"):
        load(ROOT / "params.yaml", ["variants.dide={knowledge: [attn_cross, hidden]}"])


def test_freezing_keeps_the_weights_and_the_saved_state(tmp_path):
    """Freezing changes what gets a gradient, nothing the student holds: the same keys and values before and after,
    and a saved student loads with every parameter trainable again."""
    torch.manual_seed(0)
    student = DualEncoder.from_teacher(_teacher(("nlvr2",), frozen=False), 16, task="nlvr2", num_outputs=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    frozen = student.freeze_unused_heads()
    assert frozen
    for name, param in student.named_parameters():
        assert param.requires_grad == (name.split(".")[0] not in frozen), name
    after = student.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    student.save(tmp_path)
    assert all(p.requires_grad for p in DualEncoder.load(tmp_path).parameters())


def test_a_student_copied_from_a_frozen_teacher_is_trainable():
    """distill_pretrain freezes its teacher before the student copies the towers: the copies must still train."""
    student = DualEncoder.from_teacher(_teacher(("mlm", "itm")), 16, task="pretrain")
    assert all(p.requires_grad for p in student.parameters())
