"""teacher.init / teacher.finetuned: ViLT checkpoints (tiny, written locally with save_pretrained; no download) load as
teachers with their weights, a fresh ITM head when the checkpoint has none, a third modality type for NLVR2, and
one-line errors naming the params key when a source is missing, is not ViLT or does not fit."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
import transformers
from transformers import ViltConfig

from vldistill.config import ConfigError, TeacherParams
from vldistill.models.dual import DualEncoder
from vldistill.models.hub import check_sources, check_sources_or_exit, load_finetuned_teacher, load_init_teacher

T = 8
SIZE = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, patch_size=16, max_text_len=T)


def _config(**extra) -> ViltConfig:
    return ViltConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      image_size=64, patch_size=16, max_position_embeddings=T, **extra)


def _save(arch: str, path, **extra):
    torch.manual_seed(0)
    model = getattr(transformers, arch)(_config(**extra)).eval()
    model.save_pretrained(path)
    return model


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (2, T), generator=g)
    return ids, torch.ones(2, T, dtype=torch.long), torch.rand(2, 3, 64, 64, generator=g)


def test_mlm_checkpoint_loads_with_fresh_itm_head_and_three_image_types(tmp_path):
    hf = _save("ViltForMaskedLM", tmp_path)
    assert hf.config.modality_type_vocab_size == 2  # as dandelin/vilt-b32-mlm
    teacher = load_init_teacher(str(tmp_path), ("mlm", "itm"), params=TeacherParams(**SIZE, init="./x"))
    hf_state = hf.state_dict()
    for name, value in teacher.state_dict().items():
        if name.startswith(("vilt.", "mlm_score.")) and "token_type" not in name:
            torch.testing.assert_close(value, hf_state[name], rtol=0, atol=0, msg=name)
    types = teacher.vilt.embeddings.token_type_embeddings.weight
    old = hf_state["vilt.embeddings.token_type_embeddings.weight"]
    assert types.shape == (3, 32) and teacher.config.modality_type_vocab_size == 3
    torch.testing.assert_close(types[:2], old)
    torch.testing.assert_close(types[2], old[1])  # the second NLVR2 image starts as ViLT's image type
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        sequence, pooled = teacher.encode(ids, mask, pixels, image_token_type_idx=2)
        assert teacher.itm_logits(pooled).shape == (2, 2)  # fresh head, usable
        assert teacher.mlm_logits(sequence, T).shape == (2, T, 50)
        student = DualEncoder.from_teacher(teacher, fusion_hidden=16)
        assert student.encode_image(pixels, 2).cls.shape == (2, 32)


def test_widened_teacher_saves_and_reloads(tmp_path):
    _save("ViltForMaskedLM", tmp_path / "hf")
    teacher = load_init_teacher(str(tmp_path / "hf"))
    teacher.save(tmp_path / "ours")
    again = load_init_teacher(str(tmp_path / "ours"))  # a ViltTeacher.save directory is a source too
    assert again.heads == ("mlm", "itm")
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_finetuned_vqa_checkpoint_keeps_its_head_and_logits(tmp_path):
    hf = _save("ViltForQuestionAnswering", tmp_path, num_labels=7)
    params = TeacherParams(**SIZE, finetuned={"vqa": str(tmp_path)})
    teacher = load_finetuned_teacher(params, "vqa").eval()
    assert teacher.heads == ("vqa",)
    ids, mask, pixels = _inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                      pixel_mask=torch.ones(2, 64, 64, dtype=torch.long)).logits
        got = teacher.classify(ids, mask, pixels)
    assert got.shape == (2, 7)
    assert (got - expected).abs().max() <= 1e-5  # the added modality row changes nothing for one image


def _one_line_error(fn, *fragments):
    with pytest.raises(ConfigError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_or_wrong_local_sources_fail_in_one_line(tmp_path):
    _one_line_error(lambda: load_init_teacher(str(tmp_path / "nope")), "teacher.init=", "nope", "not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: load_init_teacher(str(tmp_path / "empty")), "teacher.init=", "no config.json")
    transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=48).save_pretrained(tmp_path / "bert")
    _one_line_error(lambda: load_init_teacher(str(tmp_path / "bert")), "teacher.init=", "'bert'", "not ViLT")
    _config().save_pretrained(tmp_path / "no_weights")
    _one_line_error(lambda: load_init_teacher(str(tmp_path / "no_weights")), "teacher.init=", "no weights")


def test_checkpoint_without_the_required_head_or_size_fails(tmp_path):
    _save("ViltForMaskedLM", tmp_path)
    _one_line_error(lambda: load_finetuned_teacher(TeacherParams(**SIZE, finetuned={"vqa": str(tmp_path)}), "vqa"),
                    "teacher.finetuned.vqa=", "holds heads ['mlm']", "['vqa']")
    params = TeacherParams(**{**SIZE, "hidden_size": 64})
    _one_line_error(lambda: load_init_teacher(str(tmp_path), params=params), "teacher.hidden_size=64", "has 32")
    params = TeacherParams(**{**SIZE, "max_text_len": 40})
    _one_line_error(lambda: load_init_teacher(str(tmp_path), params=params), "teacher.max_text_len=40", "has 8")


def test_unreachable_hub_id_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    _one_line_error(lambda: load_init_teacher("nobody/no-such-vilt"), 'teacher.init="nobody/no-such-vilt"',
                    "cannot read")


def test_check_sources_runs_before_any_work(tmp_path, capsys):
    check_sources(TeacherParams())  # scratch, nothing fine-tuned: nothing to check
    check_sources(TeacherParams(init="dandelin/vilt-b32-mlm"))  # hub ids are resolved when loaded
    _save("ViltForImagesAndTextClassification", tmp_path / "nlvr2", num_images=2, modality_type_vocab_size=3)
    params = TeacherParams(init=str(tmp_path / "nlvr2"),
                           finetuned={"nlvr2": str(tmp_path / "nlvr2"), "vqa": str(tmp_path / "gone")})
    _one_line_error(lambda: check_sources(params), "teacher.finetuned.vqa=", "gone", "not found")
    capsys.readouterr()  # drop save_pretrained's progress bar
    with pytest.raises(SystemExit) as info:
        check_sources_or_exit(params)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: teacher.finetuned.vqa=")


def test_finetuned_nlvr2_checkpoint_keeps_its_three_types(tmp_path):
    hf = _save("ViltForImagesAndTextClassification", tmp_path, num_images=2, modality_type_vocab_size=3)
    teacher = load_finetuned_teacher(TeacherParams(**SIZE, finetuned={"nlvr2": str(tmp_path)}), "nlvr2")
    torch.testing.assert_close(teacher.vilt.embeddings.token_type_embeddings.weight,
                               hf.state_dict()["vilt.embeddings.token_type_embeddings.weight"], rtol=0, atol=0)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ViltForImagesAndTextClassification"]
