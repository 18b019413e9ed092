"""Teacher and dual encoder: shapes, deterministic image tokens, initialisation from the teacher, attention capture."""

from __future__ import annotations

import pytest
import torch

from vldistill.config import TeacherParams
from vldistill.distill.attention import capture_qk, cross_modal_attention, split_joint
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher, patch_tokens, vilt_config

B, T, V = 3, 10, 60


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    params = TeacherParams(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_text_len=T)
    return ViltTeacher(vilt_config(params, 48, V)).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 1:] = 0  # a row with only [CLS]
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_left": torch.rand(B, 3, 48, 48, generator=g),
            "pixel_values_right": torch.rand(B, 3, 48, 48, generator=g), "labels": torch.tensor([0, 1, 1])}


def test_teacher_shapes(teacher, batch):
    sequence, pooled = teacher.encode(batch["input_ids"], batch["attention_mask"], batch["pixel_values_left"])
    assert sequence.shape == (B, T + 10, 32) and pooled.shape == (B, 32)
    assert teacher.nlvr2_logits(*[batch[k] for k in ("input_ids", "attention_mask", "pixel_values_left",
                                                       "pixel_values_right")]).shape == (B, 2)
    assert teacher.mlm_logits(sequence, T).shape == (B, T, V)
    assert teacher.itm_logits(pooled).shape == (B, 2)


def test_patch_tokens_equal_vilt_visual_embed_up_to_its_permutation(teacher, batch):
    """transformers' visual_embed permutes patches at random; sorted by patch position they equal ours exactly."""
    emb = teacher.vilt.embeddings
    pixels = batch["pixel_values_left"]
    ours = patch_tokens(emb, pixels)
    theirs, mask, (patch_index, _) = emb.visual_embed(pixels, torch.ones(B, 48, 48, dtype=torch.long), max_image_length=-1)
    order = (patch_index[..., 0] * 3 + patch_index[..., 1]).argsort(dim=1)
    theirs_sorted = torch.cat([theirs[:, :1], torch.gather(theirs[:, 1:], 1, order[..., None].expand(-1, -1, 32))], 1)
    torch.testing.assert_close(ours, theirs_sorted, atol=1e-6, rtol=0)
    # and ours is deterministic
    torch.testing.assert_close(ours, patch_tokens(emb, pixels))


def test_dual_encoder_starts_from_teacher_weights(teacher, batch):
    student = DualEncoder.from_teacher(teacher, fusion_hidden=16).eval()
    torch.testing.assert_close(student.text.layer[0].attention.attention.query.weight,
                               teacher.vilt.encoder.layer[0].attention.attention.query.weight)
    # separate weights: changing one tower leaves the other and the teacher untouched
    with torch.no_grad():
        student.text.layer[0].attention.attention.query.weight.add_(1.0)
    assert not torch.equal(student.image.layer[0].attention.attention.query.weight,
                           student.text.layer[0].attention.attention.query.weight)
    text = student.encode_text(batch["input_ids"], batch["attention_mask"])
    image = student.encode_image(batch["pixel_values_left"], 1)
    assert text.sequence.shape == (B, T, 32) and image.sequence.shape == (B, 10, 32)
    assert student.fuse(text.cls, image.cls).shape == (B, 16)
    logits = student.nlvr2_logits(batch["input_ids"], batch["attention_mask"], batch["pixel_values_left"],
                                  batch["pixel_values_right"])
    cached = student.nlvr2_from_cls(text.cls, image.cls, student.encode_image(batch["pixel_values_right"], 2).cls)
    torch.testing.assert_close(logits, cached)
    assert student.itc_logits(text.cls, image.cls).shape == (B, B)


def test_text_tower_embeddings_equal_teacher_text_embeddings(teacher):
    """The text tower's input = the teacher's word/position embeddings + modality type 0."""
    student = DualEncoder.from_teacher(teacher, 16).eval()
    ids = torch.randint(5, V, (2, T))
    emb = teacher.vilt.embeddings
    expected = emb.text_embeddings(input_ids=ids) + emb.token_type_embeddings(torch.zeros_like(ids))
    got = student.text.embeddings(input_ids=ids) + student.text.modality
    torch.testing.assert_close(got, expected)


def test_cross_modal_blocks_equal_renormalised_output_attentions(teacher, batch):
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values_left"]
    image_embeds = patch_tokens(teacher.vilt.embeddings, pixels)
    with capture_qk(teacher.vilt.encoder.layer, [1], 4) as qk:
        out = teacher.vilt(input_ids=ids, attention_mask=mask, image_embeds=image_embeds,
                           pixel_mask=torch.ones(B, 10, dtype=torch.long), output_attentions=True)
    joint = out.attentions[1]  # (B, H, T+I, T+I)
    image_mask = torch.ones(B, 10, dtype=torch.bool)
    t2i, i2t = cross_modal_attention(*split_joint(qk[1], T), mask.bool(), image_mask)
    ref_t2i = joint[:, :, :T, T:] / joint[:, :, :T, T:].sum(-1, keepdim=True)
    ref_i2t = joint[:, :, T:, :T] / joint[:, :, T:, :T].sum(-1, keepdim=True)
    torch.testing.assert_close(t2i, ref_t2i, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(i2t, ref_i2t, atol=1e-5, rtol=1e-4)
    assert t2i.shape == (B, 4, T, 10) and i2t.shape == (B, 4, 10, T)
    assert (i2t[1, :, :, 6:] == 0).all() and torch.allclose(i2t.sum(-1), torch.ones(B, 4, 10))


def test_save_load_round_trip(teacher, tmp_path, batch):
    teacher.save(tmp_path / "t")
    again = ViltTeacher.load(tmp_path / "t").eval()
    args = [batch[k] for k in ("input_ids", "attention_mask", "pixel_values_left", "pixel_values_right")]
    torch.testing.assert_close(again.nlvr2_logits(*args), teacher.nlvr2_logits(*args))
    student = DualEncoder.from_teacher(teacher, 16).eval()
    student.save(tmp_path / "s")
    torch.testing.assert_close(DualEncoder.load(tmp_path / "s").eval().nlvr2_logits(*args), student.nlvr2_logits(*args))
