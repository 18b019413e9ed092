"""params.paper.yaml: it loads through the schema with the paper's budgets, and every model builds at ViLT-B/32 size
(random weights, no download) and runs one forward pass on a 384×640 image with 40 text tokens.

Also the schema keys the paper scale adds: ``teacher.init`` / ``teacher.finetuned`` forms, per-task budgets
(:meth:`Params.budget`), ``train.augment`` and its one-line errors."""

from __future__ import annotations

import pytest
import torch

from vldistill.config import BudgetOverride, ConfigError, StageBudget, StudentParams, load
from vldistill.models.dual import DualEncoder
from vldistill.models.fusion import fusion_student
from vldistill.models.teacher import ViltTeacher, patch_tokens, vilt_config

from conftest import ROOT

PAPER = ROOT / "params.paper.yaml"
BERT_VOCAB = 30522  # bert-base-uncased, as ViLT
VQA_ANSWERS = 3129  # VQAv2 answers given >= 9 times (ViLT's head)
H, W, T = 384, 640, 40
IMAGE_TOKENS = 1 + (384 // 32) * (640 // 32)  # [CLS] + a 12 × 20 patch grid = 241


@pytest.fixture(scope="module")
def paper():
    return load(PAPER)


def test_paper_params_load_with_the_paper_settings(paper):
    assert paper.tasks == ["nlvr2", "snli_ve", "vqa", "retrieval"]
    for task in ("pretrain", *paper.tasks):
        section = getattr(paper.data, task)
        assert section.source == "official" and section.root.startswith("data/official/")
        assert section.image_size == [384, 640]
    assert paper.tokenizer.pretrained == "bert-base-uncased"
    t = paper.teacher
    assert t.init == "dandelin/vilt-b32-mlm" and sorted(t.finetuned) == ["nlvr2", "retrieval", "vqa"]
    assert (t.hidden_size, t.num_layers, t.num_heads, t.intermediate_size, t.patch_size, t.max_text_len,
            t.pixel_norm) == (768, 12, 12, 3072, 32, 40, "vilt")
    assert (paper.fabric.accelerator, paper.fabric.precision, paper.fabric.devices) == ("cuda", "bf16-mixed", 1)
    assert paper.train.augment.randaugment and not paper.distill.cache_teacher


@pytest.mark.parametrize("stage, task, epochs, effective_batch", [
    ("distill_finetune", "nlvr2", 20, 128),
    ("distill_finetune", "vqa", 10, 256),
    ("distill_finetune", "snli_ve", 10, 256),
    ("distill_finetune", "retrieval", 10, 256),
    ("teacher_finetune", "nlvr2", 10, 128),
    ("teacher_finetune", "snli_ve", 10, 256),
    ("distill_pretrain", None, 10, 256),
])
def test_paper_budgets_per_stage_and_task(paper, stage, task, epochs, effective_batch):
    budget = paper.budget(stage, task)
    assert (budget.epochs, budget.effective_batch, budget.lr) == (epochs, effective_batch, 1e-4)


def test_budget_override_has_every_stage_budget_field_and_resolves():
    assert list(BudgetOverride.model_fields) == list(StageBudget.model_fields)
    base = StageBudget(epochs=3, batch_size=8, effective_batch=32, lr=1e-3)
    assert BudgetOverride(epochs=5).resolve(base) == base.model_copy(update={"epochs": 5})
    assert BudgetOverride(effective_batch=None).resolve(base).effective_batch is None  # explicit null: no accumulation
    params = load(ROOT / "params.yaml", ["train.distill_finetune_tasks={nlvr2: {lr: 0.01}}"])
    assert params.budget("distill_finetune", "nlvr2").lr == 0.01
    assert params.budget("distill_finetune", "nlvr2").epochs == params.train.distill_finetune.epochs
    assert params.budget("distill_pretrain") == params.train.distill_pretrain
    with pytest.raises(ConfigError, match="train.augment: no such training stage"):
        params.budget("augment")


@pytest.mark.parametrize("init", ["scratch", "dandelin/vilt-b32-mlm", "./models/vilt", "/abs/vilt", "~/vilt",
                                  "models/teacher_pretrain/x"])
def test_teacher_init_forms(init):
    assert load(ROOT / "params.yaml", [f"teacher.init={init}"]).teacher.init == init


def test_embedded_default_keeps_augmentation_off():
    params = load(ROOT / "params.yaml")
    assert not params.train.augment.randaugment and params.teacher.init == "scratch" and params.teacher.finetuned == {}


# ---------------------------------------------------------------------------------------- models at paper size
def _inputs(generator: torch.Generator):
    ids = torch.randint(1000, BERT_VOCAB, (1, T), generator=generator)
    mask = torch.ones(1, T, dtype=torch.long)
    mask[0, 30:] = 0
    return ids, mask, torch.randn(1, 3, H, W, generator=generator)


@pytest.fixture(scope="module")
def pretrained(paper):
    """The paper-size teacher as teacher_pretrain leaves it (MLM + ITM), random weights."""
    torch.manual_seed(0)
    return ViltTeacher(vilt_config(paper.teacher, image_size=H, vocab_size=BERT_VOCAB), heads=("mlm", "itm")).eval()


def test_paper_teacher_pretraining_heads(pretrained):
    ids, mask, pixels = _inputs(torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert patch_tokens(pretrained.vilt.embeddings, pixels).shape == (1, IMAGE_TOKENS, 768)  # 12×12 grid resized
        sequence, pooled = pretrained.encode(ids, mask, pixels)
        assert sequence.shape == (1, T + IMAGE_TOKENS, 768) and pooled.shape == (1, 768)
        assert pretrained.mlm_logits(sequence, T).shape == (1, T, BERT_VOCAB)
        assert pretrained.itm_logits(pooled).shape == (1, 2)
        assert torch.isfinite(sequence).all()


@pytest.mark.parametrize("head, shape", [("nlvr2", (1, 2)), ("vqa", (1, VQA_ANSWERS)), ("snli_ve", (1, 3)),
                                         ("retrieval", (1, 1))])
def test_paper_teacher_task_heads(paper, head, shape):
    config = vilt_config(paper.teacher, image_size=H, vocab_size=BERT_VOCAB)
    config.num_labels = VQA_ANSWERS
    torch.manual_seed(0)
    teacher = ViltTeacher(config, heads=(head,)).eval()
    ids, mask, pixels = _inputs(torch.Generator().manual_seed(1))
    with torch.inference_mode():
        if head == "nlvr2":
            logits = teacher.nlvr2_logits(ids, mask, pixels, pixels.flip(-1))
        elif head == "retrieval":
            logits = teacher.rank_score(ids, mask, pixels)
        else:
            logits = teacher.classify(ids, mask, pixels)
    assert logits.shape == shape and torch.isfinite(logits).all()


def test_paper_dual_encoder(paper, pretrained):
    student = DualEncoder.from_teacher(pretrained, paper.student.fusion_hidden).eval()
    ids, mask, pixels = _inputs(torch.Generator().manual_seed(2))
    with torch.inference_mode():
        text = student.encode_text(ids, mask)
        left, right = student.encode_image(pixels, 1), student.encode_image(pixels.flip(-1), 2)
        assert text.sequence.shape == (1, T, 768) and left.sequence.shape == (1, IMAGE_TOKENS, 768)
        assert student.nlvr2_from_cls(text.cls, left.cls, right.cls).shape == (1, 2)
        assert student.itc_logits(text.cls, left.cls).shape == (1, 1)
        assert student.fuse(text.cls, left.cls).shape == (1, paper.student.fusion_hidden)


def test_paper_fusion_student(paper, pretrained):
    student = fusion_student(pretrained, StudentParams(kind="fusion"), heads=("nlvr2",)).eval()
    assert student.config.num_hidden_layers == 6 and student.config.hidden_size == 768
    ids, mask, pixels = _inputs(torch.Generator().manual_seed(3))
    with torch.inference_mode():
        sequence, _ = student.encode(ids, mask, pixels)
        assert sequence.shape == (1, T + IMAGE_TOKENS, 768)
        assert student.nlvr2_logits(ids, mask, pixels, pixels.flip(-1)).shape == (1, 2)
