"""Every knowledge term: zero (or minimal) when the student equals the teacher, positive otherwise, finite with
length-1 text rows, gradients only to the student; the NCE queue is FIFO; fusion students map layers uniformly."""

from __future__ import annotations

import pytest
import torch

from vldistill.config import DistillParams, StudentParams, TeacherParams
from vldistill.distill.attention import layer_pairs
from vldistill.distill.knowledge import KnowledgeModules, LayerView, knowledge_terms
from vldistill.distill.losses import TokenNCE
from vldistill.models.dual import DualEncoder
from vldistill.models.fusion import fusion_student
from vldistill.models.teacher import ViltTeacher, patch_tokens, vilt_config
from vldistill.train.objectives import dide_loss, distill_pairs, teacher_targets

B, H, T, I, D = 3, 2, 6, 5, 8
TERMS = ("attn_cross", "attn_uni", "attn_all", "attn_mse", "hidden")


def _view(seed: int, joint: bool, grad: bool = False) -> LayerView:
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(*shape, generator=g) for shape in [(B, H, T, D), (B, H, T, D), (B, H, I, D), (B, H, I, D),
                                                          (B, T, 16), (B, I, 16)]]
    if grad:
        t = [x.requires_grad_(True) for x in t]
    return LayerView(*t, joint=joint)


def _text_mask() -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False  # a text row of length 1 ([CLS] only)
    return mask


@pytest.mark.parametrize("joint", [False, True])
def test_terms_zero_at_teacher_and_positive_otherwise(joint):
    teacher = _view(0, joint)
    same = knowledge_terms(TERMS, [(0, 0)], [{0: teacher}], [{0: teacher}], _text_mask())
    assert set(same) == set(TERMS)
    for name, value in same.items():
        assert value.abs() < 1e-6, name
    other = knowledge_terms(TERMS, [(0, 0)], [{0: _view(1, joint)}], [{0: teacher}], _text_mask())
    for name, value in other.items():
        assert torch.isfinite(value) and value > 1e-4, name


def test_gradients_are_finite_with_length_one_text_and_skip_padded_queries():
    student = _view(1, joint=False, grad=True)
    terms = knowledge_terms(TERMS, [(0, 0)], [{0: student}], [{0: _view(0, joint=False)}], _text_mask())
    sum(terms.values()).backward()
    for tensor in (student.q_text, student.k_text, student.q_image, student.k_image, student.hidden_text):
        assert torch.isfinite(tensor.grad).all()
    assert (student.q_text.grad[2, :, 1:] == 0).all()  # padded text queries of the length-1 row: no gradient


def test_token_nce_is_minimal_at_teacher_and_queue_is_fifo():
    torch.manual_seed(0)
    nce = TokenNCE(16, 16, queue_size=5, temperature=0.1)
    with torch.no_grad():
        nce.projection.weight.copy_(torch.eye(16))
        nce.projection.bias.zero_()
    mask = _text_mask()
    teacher = torch.randn(B, T, 16)
    nce.enqueue(torch.nn.functional.normalize(torch.randn(5, 16), dim=-1))
    nce.eval()  # no enqueue while comparing
    at_teacher = nce(teacher, teacher, mask)
    elsewhere = nce(torch.randn(B, T, 16), teacher, mask)
    assert at_teacher < elsewhere
    # FIFO and size
    fresh = TokenNCE(4, 4, queue_size=3, temperature=0.1)
    rows = torch.arange(20, dtype=torch.float32).view(5, 4)
    fresh.enqueue(rows[:2])
    assert int(fresh.queue_len) == 2
    fresh.enqueue(rows[2:4])
    assert int(fresh.queue_len) == 3
    kept = {tuple(r.tolist()) for r in fresh.queue}
    assert kept == {tuple(rows[i].tolist()) for i in (1, 2, 3)}  # the oldest row (0) left first
    fresh.enqueue(rows)  # more than the queue holds: only the newest 3 stay
    assert {tuple(r.tolist()) for r in fresh.queue} == {tuple(rows[i].tolist()) for i in (2, 3, 4)}


def test_token_nce_queue_takes_a_steps_keys_at_step_end_from_every_process_in_rank_order():
    """The queue changes only at ``step_end``: both forwards of a step (two micro-batches, or NLVR2's two image
    passes) see the same past keys. Two processes, each with half of the step's examples and a gather that joins
    their keys in rank order (as :func:`vldistill.train.loop.gather_rows` does), end the step with the queue of one
    process that saw all of them, and with the same losses."""
    torch.manual_seed(0)
    one = TokenNCE(8, 8, queue_size=50, temperature=0.1)
    ranks = [TokenNCE(8, 8, queue_size=50, temperature=0.1) for _ in range(2)]
    for nce in ranks:
        nce.load_state_dict(one.state_dict())
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = False  # processes hold different numbers of valid tokens
    for step in range(3):
        student, teacher = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
        queue_before = one.queue.clone()
        whole = [one(student[:2], teacher[:2], mask[:2]), one(student[2:], teacher[2:], mask[2:])]  # accumulation 2
        assert torch.equal(one.queue, queue_before), "no enqueue before step_end"
        halves = [nce(student[2 * r:2 * r + 2], teacher[2 * r:2 * r + 2], mask[2 * r:2 * r + 2])
                  for r, nce in enumerate(ranks)]
        torch.testing.assert_close(torch.stack(halves), torch.stack(whole))
        pending = [torch.cat(nce.pending) for nce in ranks]
        for nce in ranks:
            nce.step_end(lambda rows: torch.cat(pending))
        one.step_end()
        assert int(one.queue_len) == min(50, 11 * (step + 1)) and not one.pending
        for nce in ranks:
            assert torch.equal(nce.queue, one.queue) and torch.equal(nce.queue_ptr, one.queue_ptr)
    one.eval()
    one(student, teacher, mask)
    one.step_end()
    assert int(one.queue_len) == 33, "evaluation forwards hold nothing back"


def test_layer_pairs():
    assert layer_pairs(4, 4, "last") == [(3, 3)]
    assert layer_pairs(4, 4, "layerwise") == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert layer_pairs(2, 4, "layerwise") == [(0, 1), (1, 3)]
    assert layer_pairs(3, 12, "layerwise") == [(0, 3), (1, 7), (2, 11)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    params = TeacherParams(hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, max_text_len=T)
    return ViltTeacher(vilt_config(params, 48, 40), heads=("nlvr2",)).eval().requires_grad_(False)


def _batch():
    g = torch.Generator().manual_seed(3)
    mask = _text_mask().long()
    return {"input_ids": torch.randint(5, 40, (B, T), generator=g), "attention_mask": mask,
            "pixel_values_left": torch.rand(B, 3, 48, 48, generator=g),
            "pixel_values_right": torch.rand(B, 3, 48, 48, generator=g), "labels": torch.tensor([0, 1, 0]),
            "index": torch.arange(B)}


def test_student_and_teacher_see_the_same_image_tokens(teacher):
    student = DualEncoder.from_teacher(teacher, 16)
    pixels = _batch()["pixel_values_left"]
    torch.testing.assert_close(patch_tokens(student.image, pixels), patch_tokens(teacher.vilt.embeddings, pixels))
    small = fusion_student(teacher, StudentParams(kind="fusion", num_layers=2), heads=("nlvr2",))
    torch.testing.assert_close(patch_tokens(small.vilt.embeddings, pixels), patch_tokens(teacher.vilt.embeddings, pixels))


def test_fusion_student_takes_uniformly_mapped_teacher_layers(teacher):
    small = fusion_student(teacher, StudentParams(kind="fusion", num_layers=2), heads=("nlvr2",))
    for s_layer, t_layer in [(0, 1), (1, 3)]:
        torch.testing.assert_close(small.vilt.encoder.layer[s_layer].output.dense.weight,
                                   teacher.vilt.encoder.layer[t_layer].output.dense.weight)
    narrow = fusion_student(teacher, StudentParams(kind="fusion", num_layers=2, hidden_size=16, num_heads=2),
                            heads=("nlvr2",))
    assert narrow.config.hidden_size == 16 and narrow.config.intermediate_size == 32


@pytest.mark.parametrize("kind", ["dual", "fusion"])
@pytest.mark.parametrize("layers", ["last", "layerwise"])
def test_every_knowledge_term_trains_the_student_only(teacher, kind, layers):
    knowledge = ["gt", "soft", "hidden", "attn_all", "attn_cross", "attn_uni", "attn_mse", "token_nce"]
    recipe = DistillParams(knowledge=knowledge, layers=layers, nce={"queue_size": 16, "temperature": 0.1})
    if kind == "dual":
        student = DualEncoder.from_teacher(teacher, 16).train()
    else:
        student = fusion_student(teacher, StudentParams(kind="fusion", num_layers=2, hidden_size=16, num_heads=2),
                                 heads=("nlvr2",)).train()
    student.requires_grad_(True)
    pairs = distill_pairs(recipe, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    extras = KnowledgeModules(set(knowledge), pairs, student.config.hidden_size, 32, 16, 0.1)
    t_layers = sorted({t for _, t in pairs})
    teacher.requires_grad_(True)  # even if trainable, the teacher must receive no gradient
    loss_fn = dide_loss(recipe, pairs, lambda b: teacher_targets(teacher, b, t_layers, True), extras)
    terms = loss_fn(student, _batch())
    assert set(terms) == set(knowledge) | {"loss"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    teacher.requires_grad_(False)
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_cached_teacher_targets_match_live_ones(teacher):
    """The per-example cache (float16 maps) gives the same loss as running the teacher on the batch."""
    from vldistill.train.objectives import cache_teacher_targets

    class Split:
        def __init__(self, batch):
            self.batch = batch

        def loader(self, batch_size, shuffle, seed):
            return [self.batch]

    batch = _batch()
    recipe = DistillParams(knowledge=["gt", "soft", "attn_cross"])
    pairs = distill_pairs(recipe, 4, 4)
    student = DualEncoder.from_teacher(teacher, 16).eval()
    cached = cache_teacher_targets(teacher, Split(batch), [3], True, 8, torch.device("cpu"))
    live = lambda b: teacher_targets(teacher, b, [3], True)  # noqa: E731
    with torch.no_grad():
        a = dide_loss(recipe, pairs, cached)(student, batch)
        b = dide_loss(recipe, pairs, live)(student, batch)
    for name in ("gt", "soft", "attn_cross"):
        torch.testing.assert_close(a[name], b[name], atol=1e-3, rtol=1e-3)
