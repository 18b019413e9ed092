"""The teacher loads transformers' ViLT checkpoints (saved locally with save_pretrained, no download) with every key
mapped, and reproduces their logits on the same inputs (max abs difference <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import ViltConfig

from vldistill.models.teacher import ViltTeacher

B, T = 2, 8


def _config(**extra) -> ViltConfig:
    return ViltConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      image_size=64, patch_size=16, max_position_embeddings=T, **extra)


def _inputs(num_images: int | None = None):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    shape = (B, 3, 64, 64) if num_images is None else (B, num_images, 3, 64, 64)
    return ids, mask, torch.rand(*shape, generator=g)


CASES = {
    "ViltForQuestionAnswering": (dict(num_labels=7), None, lambda t, ids, m, px: t.classify(ids, m, px)),
    "ViltForImagesAndTextClassification": (
        dict(num_labels=2, num_images=2, modality_type_vocab_size=3), 2,
        lambda t, ids, m, px: t.nlvr2_logits(ids, m, px[:, 0], px[:, 1])),
    "ViltForMaskedLM": (dict(), None,
                        lambda t, ids, m, px: t.mlm_logits(t.encode(ids, m, px)[0], T)),
    "ViltForImageAndTextRetrieval": (dict(), None, lambda t, ids, m, px: t.rank_score(ids, m, px)),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_teacher_reproduces_hf_logits(arch, tmp_path):
    extra, num_images, ours = CASES[arch]
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(_config(**extra)).eval()
    hf.save_pretrained(tmp_path)
    teacher = ViltTeacher.from_pretrained(tmp_path).eval()
    ids, mask, pixels = _inputs(num_images)
    with torch.no_grad():
        pixel_mask = torch.ones(B, 64, 64, dtype=torch.long) if num_images is None else torch.ones(B, 2, 64, 64, dtype=torch.long)
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_mask=pixel_mask).logits
        got = ours(teacher, ids, mask, pixels)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5


def test_teacher_save_load_keeps_tied_mlm_decoder(tmp_path):
    torch.manual_seed(0)
    teacher = ViltTeacher(_config(), heads=("mlm", "itm"))
    teacher.save(tmp_path)
    again = ViltTeacher.load(tmp_path)
    assert again.mlm_score.decoder.weight is again.vilt.embeddings.text_embeddings.word_embeddings.weight
    torch.testing.assert_close(again.state_dict()["vilt.embeddings.text_embeddings.word_embeddings.weight"],
                               teacher.state_dict()["vilt.embeddings.text_embeddings.word_embeddings.weight"])


def test_checkpoint_that_does_not_fit_is_rejected(tmp_path):
    hf = transformers.ViltForQuestionAnswering(_config(num_labels=3))
    hf.save_pretrained(tmp_path)
    state_path = tmp_path / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(state_path)
    state["vilt.unexpected.weight"] = torch.zeros(1)
    save_file(state, state_path)
    with pytest.raises(RuntimeError, match="unexpected"):
        ViltTeacher.from_pretrained(tmp_path)


def test_untied_teacher_keeps_its_own_decoder(tmp_path):
    torch.manual_seed(0)
    teacher = ViltTeacher(_config(), heads=("mlm", "itm"), tie_mlm_decoder=False)
    with torch.no_grad():
        teacher.mlm_score.decoder.weight.add_(1.0)
    teacher.save(tmp_path)
    again = ViltTeacher.load(tmp_path)
    assert again.mlm_score.decoder.weight is not again.vilt.embeddings.text_embeddings.word_embeddings.weight
    torch.testing.assert_close(again.mlm_score.decoder.weight, teacher.mlm_score.decoder.weight)
