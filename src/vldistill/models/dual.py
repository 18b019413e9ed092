"""The DiDE student: a dual encoder with separate text and image towers and a light fusion MLP.

Both towers start as copies of the (pre-trained) teacher's embeddings and transformer layers, with separate weights
from then on. ``encode_text``, ``encode_image`` and ``fuse`` are separate calls, so image representations can be
computed once and cached: a query then costs the text tower plus the MLP only.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViltConfig
from transformers.models.vilt.modeling_vilt import ViltMLMHead

from vldistill.io import atomic_path, write_json
from vldistill.models.teacher import ViltTeacher, patch_tokens


@dataclass
class TowerOutput:
    """``sequence (B, N, D)`` after the final LayerNorm; ``cls (B, D)`` = pooler(sequence[:, 0])."""

    sequence: torch.Tensor
    cls: torch.Tensor


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, N)`` 1/0 mask → ``(B, 1, 1, N)`` additive mask (0 for real tokens, dtype-min for padding)."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layers(layers: nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply ViLT layers to ``hidden (B, N, D)`` with an optional ``(B, N)`` key mask."""
    extended = additive_mask(mask, hidden.dtype)
    for layer in layers:
        hidden = layer(hidden, extended)[0]
    return hidden


class TextTower(nn.Module):
    """Text encoder: the teacher's word/position embeddings + modality type 0, its layers, final norm and pooler."""

    def __init__(self, vilt):
        super().__init__()
        self.embeddings = copy.deepcopy(vilt.embeddings.text_embeddings)
        self.modality = nn.Parameter(vilt.embeddings.token_type_embeddings.weight[0].detach().clone())
        self.layer = copy.deepcopy(vilt.encoder.layer)
        self.layernorm = copy.deepcopy(vilt.layernorm)
        self.pooler = copy.deepcopy(vilt.pooler)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
        """input_ids, attention_mask ``(B, T)`` → TowerOutput with sequence ``(B, T, D)``."""
        hidden = self.embeddings(input_ids=input_ids) + self.modality
        sequence = self.layernorm(run_layers(self.layer, hidden, attention_mask))
        return TowerOutput(sequence, self.pooler(sequence))


class ImageTower(nn.Module):
    """Image encoder: the teacher's patch embedding, CLS and position embeddings, modality types (1, or 2 for
    NLVR2's second image), its layers, final norm and pooler."""

    def __init__(self, vilt):
        super().__init__()
        emb = vilt.embeddings
        self.config = emb.config
        self.patch_embeddings = copy.deepcopy(emb.patch_embeddings)
        self.cls_token = nn.Parameter(emb.cls_token.detach().clone())
        self.position_embeddings = nn.Parameter(emb.position_embeddings.detach().clone())
        self.token_type_embeddings = copy.deepcopy(emb.token_type_embeddings)
        self.dropout = copy.deepcopy(emb.dropout)
        self.layer = copy.deepcopy(vilt.encoder.layer)
        self.layernorm = copy.deepcopy(vilt.layernorm)
        self.pooler = copy.deepcopy(vilt.pooler)

    def forward(self, pixel_values: torch.Tensor, image_token_type_idx: int = 1) -> TowerOutput:
        """pixel_values ``(B, 3, H, W)`` → TowerOutput with sequence ``(B, I, D)``, ``I = 1 + patches``."""
        tokens = patch_tokens(self, pixel_values)
        tokens = tokens + self.token_type_embeddings.weight[image_token_type_idx]
        sequence = self.layernorm(run_layers(self.layer, tokens, None))
        return TowerOutput(sequence, self.pooler(sequence))


def task_classifier(task: str, fusion_hidden: int, num_outputs: int) -> nn.Module | None:
    """The task head over fused vectors: NLVR2 ``(B, 2F)`` (two fused pairs) → ``(B, C)``; SNLI-VE / VQA ``(B, F)`` →
    ``(B, C)``; none for retrieval and pre-training (they score with ``itc_logits`` / ``itm_score``)."""
    f = fusion_hidden
    if task == "nlvr2":
        return nn.Sequential(nn.Linear(2 * f, 2 * f), nn.LayerNorm(2 * f), nn.GELU(), nn.Linear(2 * f, num_outputs))
    if task in ("snli_ve", "vqa"):
        return nn.Sequential(nn.Linear(f, 2 * f), nn.LayerNorm(2 * f), nn.GELU(), nn.Linear(2 * f, num_outputs))
    return None


HEADS = ("fusion", "classifier", "itm_score", "text_proj", "image_proj", "logit_scale", "mlm_score")
"""The dual encoder's parts above the two towers (every one of them is a submodule or parameter of that name)."""

HEADS_USED = {
    "pretrain": ("fusion", "itm_score", "text_proj", "image_proj", "logit_scale", "mlm_score"),
    "nlvr2": ("fusion", "classifier"),
    "snli_ve": ("fusion", "classifier"),
    "vqa": ("fusion", "classifier"),
    "retrieval": ("text_proj", "image_proj", "logit_scale"),
}
"""The heads each task's training loss reads (:mod:`vldistill.train.objectives`: ``dual_pretrain_loss`` scores ITC,
ITM and MLM; ``dide_loss`` the task logits; ``retrieval_distill_loss`` the ITC similarities). Every recipe has a term
on those outputs (``gt`` or ``soft``), so what is used depends on the task only; the towers are always used."""


class DualEncoder(nn.Module):
    """DiDE dual encoder.

    - ``fuse``: MLP over ``[text_cls; image_cls]`` ``(B, 2D)`` → ``(B, F)``;
    - ``classifier`` (task head, see :func:`task_classifier`): NLVR2 fuses the text with each image and classifies
      the two fused vectors concatenated; SNLI-VE and VQA classify one fused vector;
    - ``itm_score``: ``(B, F)`` → ``(B, 2)`` on the fused vector;
    - ``text_proj`` / ``image_proj`` + learnable ``logit_scale``: normalised embeddings for ITC / retrieval;
    - ``mlm_score`` (pre-training only): the teacher's MLM head over the text tower's sequence.
    """

    def __init__(self, config: ViltConfig, fusion_hidden: int, vilt=None, task: str = "nlvr2", num_outputs: int = 2):
        super().__init__()
        if vilt is None:  # structure only (weights are loaded afterwards)
            from transformers import ViltModel

            vilt = ViltModel(config)
        self.config = config
        self.fusion_hidden = fusion_hidden
        self.task, self.num_outputs = task, num_outputs
        d, f = config.hidden_size, fusion_hidden
        self.text = TextTower(vilt)
        self.image = ImageTower(vilt)
        self.fusion = nn.Sequential(nn.Linear(2 * d, f), nn.LayerNorm(f), nn.GELU())
        self.classifier = task_classifier(task, f, num_outputs)
        self.itm_score = nn.Linear(f, 2)
        self.text_proj = nn.Linear(d, d)
        self.image_proj = nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP
        self.mlm_score = ViltMLMHead(config) if task == "pretrain" else None

    @classmethod
    def from_teacher(cls, teacher: ViltTeacher, fusion_hidden: int, task: str = "nlvr2",
                     num_outputs: int = 2) -> "DualEncoder":
        """Both towers initialised from the teacher's embeddings and layers (separate copies); for pre-training the
        MLM head too, when the teacher has one. Every parameter of the student is trainable, also when the teacher
        is frozen (``distill_pretrain`` freezes it before copying: the copies would inherit ``requires_grad=False``
        and only the heads would train)."""
        model = cls(teacher.config, fusion_hidden, vilt=teacher.vilt, task=task, num_outputs=num_outputs)
        if model.mlm_score is not None and getattr(teacher, "mlm_score", None) is not None:
            model.mlm_score.load_state_dict(teacher.mlm_score.state_dict())
        return model.requires_grad_(True)

    def with_task(self, task: str, num_outputs: int) -> "DualEncoder":
        """This student with a fresh head for ``task`` (and no MLM head): the step from pre-training to a task."""
        self.task, self.num_outputs = task, num_outputs
        self.classifier = task_classifier(task, self.fusion_hidden, num_outputs)
        self.mlm_score = None
        return self

    def freeze_unused_heads(self) -> list[str]:
        """Stop gradients (``requires_grad_(False)``) to the heads :data:`HEADS_USED` says ``self.task``'s loss never
        reads; return their names.

        DDP all-reduces the gradient of every trainable parameter after each backward and fails at the next step on
        one that got none (e.g. ``itm_score`` and the ITC projections on NLVR2). Frozen is the same as before for one
        process: AdamW skips a parameter without a gradient, and the module keeps its weights, initial random streams
        and saved state dict (the heads stay built, e.g. for a later retrieval use of a classification student)."""
        frozen = [name for name in HEADS if name not in HEADS_USED[self.task] and getattr(self, name) is not None]
        for name in frozen:
            getattr(self, name).requires_grad_(False)
        return frozen

    def encode_text(self, input_ids, attention_mask) -> TowerOutput:
        return self.text(input_ids, attention_mask)

    def encode_image(self, pixel_values, image_token_type_idx: int = 1) -> TowerOutput:
        return self.image(pixel_values, image_token_type_idx)

    def fuse(self, text_cls: torch.Tensor, image_cls: torch.Tensor) -> torch.Tensor:
        """``(B, D), (B, D)`` → fused ``(B, F)``."""
        return self.fusion(torch.cat([text_cls, image_cls], dim=-1))

    def nlvr2_from_cls(self, text_cls, left_cls, right_cls) -> torch.Tensor:
        """NLVR2 logits ``(B, 2)`` from (possibly cached) tower outputs."""
        return self.classifier(torch.cat([self.fuse(text_cls, left_cls), self.fuse(text_cls, right_cls)], dim=-1))

    def classify_from_cls(self, text_cls, image_cls) -> torch.Tensor:
        """SNLI-VE / VQA logits ``(B, C)`` from (possibly cached) tower outputs."""
        return self.classifier(self.fuse(text_cls, image_cls))

    def classify(self, input_ids, attention_mask, pixel_values) -> torch.Tensor:
        """SNLI-VE / VQA logits ``(B, C)``: text and image towers, one fused vector."""
        return self.classify_from_cls(self.encode_text(input_ids, attention_mask).cls, self.encode_image(pixel_values).cls)

    def nlvr2_logits(self, input_ids, attention_mask, pixel_values_left, pixel_values_right) -> torch.Tensor:
        text = self.encode_text(input_ids, attention_mask)
        left = self.encode_image(pixel_values_left, 1)
        right = self.encode_image(pixel_values_right, 2)
        return self.nlvr2_from_cls(text.cls, left.cls, right.cls)

    def itc_logits(self, text_cls: torch.Tensor, image_cls: torch.Tensor) -> torch.Tensor:
        """In-batch similarity ``(B_text, B_image) = exp(s) · norm(W_t t) · norm(W_i v)ᵀ``."""
        t = nn.functional.normalize(self.text_proj(text_cls), dim=-1)
        v = nn.functional.normalize(self.image_proj(image_cls), dim=-1)
        return self.logit_scale.exp().clamp(max=100.0) * t @ v.T

    # ------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(path))
        write_json(path / "student.json", {"kind": "dual", "fusion_hidden": self.fusion_hidden, "task": self.task,
                                           "num_outputs": self.num_outputs})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(state, str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> "DualEncoder":
        path = Path(path)
        if not (path / "model.safetensors").is_file() or not (path / "student.json").is_file():
            raise FileNotFoundError(f"{path}: no dual-encoder checkpoint (model.safetensors + student.json) found")
        meta = json.loads((path / "student.json").read_text())
        model = cls(ViltConfig.from_pretrained(str(path)), meta["fusion_hidden"], task=meta.get("task", "nlvr2"),
                    num_outputs=meta.get("num_outputs", 2))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model
