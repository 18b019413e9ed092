"""The teacher: transformers' ViLT fusion encoder with the heads of ViLT's pre-training and downstream tasks.

Attribute names follow transformers (``vilt``, ``mlm_score``, ``classifier``) so that hub checkpoints map onto them.
Image tokens are computed deterministically by :meth:`ViltTeacher.patch_tokens` (raster order, every patch kept) and
passed to ``ViltModel`` as ``image_embeds``: transformers' own ``visual_embed`` permutes patches with
``torch.multinomial`` even when nothing is padded, and teacher and student must see identical tokens in identical order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViltConfig, ViltModel
from transformers.models.vilt.modeling_vilt import ViltMLMHead

from vldistill.config import TeacherParams
from vldistill.io import atomic_path, write_json

HEADS = ("mlm", "itm", "nlvr2", "vqa", "snli_ve", "retrieval")
CLASSIFIER_HEADS = ("nlvr2", "vqa", "snli_ve")
"""Task heads stored under transformers' attribute ``classifier``: a teacher carries at most one of them."""
HEAD_ATTRS = {"mlm": "mlm_score", "itm": "itm_score", "nlvr2": "classifier", "vqa": "classifier",
              "snli_ve": "classifier", "retrieval": "rank_output"}
HF_ARCHITECTURES = {
    "ViltForMaskedLM": ("mlm",),
    "ViltForQuestionAnswering": ("vqa",),
    "ViltForImagesAndTextClassification": ("nlvr2",),
    "ViltForImageAndTextRetrieval": ("retrieval",),
}
"""transformers' ViLT classes and the teacher heads their checkpoints hold (same attribute names, same shapes)."""


def vilt_config(params: TeacherParams, image_size: int, vocab_size: int) -> ViltConfig:
    """A ViltConfig from the ``teacher.*`` knobs. Three modality types: text 0, image 1, NLVR2's second image 2."""
    return ViltConfig(
        vocab_size=vocab_size, hidden_size=params.hidden_size, num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads, intermediate_size=params.intermediate_size,
        hidden_dropout_prob=params.dropout, attention_probs_dropout_prob=params.dropout,
        image_size=image_size, patch_size=params.patch_size, max_position_embeddings=params.max_text_len,
        modality_type_vocab_size=3, num_images=2, max_image_length=-1,
    )


def patch_tokens(embeddings, pixel_values: torch.Tensor) -> torch.Tensor:
    """ViLT's image tokens for full (unpadded) images, every patch in raster order, before the modality embedding.

    ``[cls + pos_0; patch_ij + pos_ij]`` with position embeddings bilinearly resized (align_corners=True, as ViLT)
    to the image's patch grid, then dropout. ``embeddings`` is a ``ViltEmbeddings`` (or a module with the same
    ``patch_embeddings``, ``cls_token``, ``position_embeddings``, ``dropout``, ``config``).

    pixel_values: ``(B, 3, H, W)`` → ``(B, 1 + (H/P)·(W/P), D)``.
    """
    x = embeddings.patch_embeddings(pixel_values)  # (B, D, h, w)
    batch, dim, h, w = x.shape
    grid = embeddings.config.image_size // embeddings.config.patch_size
    spatial = embeddings.position_embeddings[:, 1:, :].transpose(1, 2).reshape(1, dim, grid, grid)
    if (h, w) != (grid, grid):
        spatial = nn.functional.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True)
    x = x.flatten(2).transpose(1, 2) + spatial.flatten(2).transpose(1, 2)
    cls = (embeddings.cls_token + embeddings.position_embeddings[:, :1, :]).expand(batch, -1, -1)
    return embeddings.dropout(torch.cat([cls, x], dim=1))


class ViltTeacher(nn.Module):
    """ViLT (``self.vilt``) with the heads named in ``heads`` (attribute names and shapes as transformers):

    - ``mlm``: ``mlm_score`` over the text positions ``(B, T, V)`` (ViltMLMHead; its decoder is tied to the word
      embeddings when ``tie_mlm_decoder``, as in ViLT and transformers' checkpoints);
    - ``itm``: ``itm_score`` on the pooled [CLS] ``(B, 2)`` (ViLT's image–text matching);
    - ``nlvr2``: ``classifier`` on the two pooled outputs concatenated ``(B, 2D)`` → ``(B, 2)``
      (ViltForImagesAndTextClassification);
    - ``vqa``: ``classifier`` ``(B, D)`` → ``(B, num_labels)`` answer logits (ViltForQuestionAnswering);
    - ``snli_ve``: ``classifier`` ``(B, D)`` → ``(B, 3)`` (ViLT's SNLI-VE head: the VQA layout with 3 outputs);
    - ``retrieval``: ``rank_output`` ``(B, D)`` → ``(B, 1)`` image–text score (ViltForImageAndTextRetrieval).
    """

    def __init__(self, config: ViltConfig, heads: tuple[str, ...] = ("mlm", "itm", "nlvr2"),
                 tie_mlm_decoder: bool = True):
        super().__init__()
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown teacher heads {sorted(unknown)}; allowed: {list(HEADS)}")
        task_heads = [h for h in heads if h in CLASSIFIER_HEADS]
        if len(task_heads) > 1:
            raise ValueError(f"heads {task_heads} all live in `classifier`; a teacher carries at most one of them")
        self.config = config
        self.heads = tuple(heads)
        self.tie_mlm_decoder = tie_mlm_decoder and "mlm" in heads
        self.vilt = ViltModel(config)
        d = config.hidden_size
        if "mlm" in heads:
            self.mlm_score = ViltMLMHead(config)
            if self.tie_mlm_decoder:
                self.mlm_score.decoder.weight = self.vilt.embeddings.text_embeddings.word_embeddings.weight
        if "itm" in heads:
            self.itm_score = nn.Linear(d, 2)
        if "nlvr2" in heads:
            self.classifier = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, 2))
        if "vqa" in heads or "snli_ve" in heads:
            outputs = config.num_labels if "vqa" in heads else 3
            self.classifier = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(), nn.Linear(2 * d, outputs))
        if "retrieval" in heads:
            self.rank_output = nn.Linear(d, 1)

    def encode(self, input_ids, attention_mask, pixel_values, image_token_type_idx: int = 1):
        """One joint pass. Returns ``(sequence (B, T+I, D), pooled (B, D))``; text occupies the first T positions."""
        image_embeds = patch_tokens(self.vilt.embeddings, pixel_values)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        out = self.vilt(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                        pixel_mask=image_mask, image_token_type_idx=image_token_type_idx)
        return out.last_hidden_state, out.pooler_output

    def nlvr2_logits(self, input_ids, attention_mask, pixel_values_left, pixel_values_right) -> torch.Tensor:
        """NLVR2 as ViLT: two joint passes (image token types 1 and 2), pooled outputs concatenated → ``(B, 2)``."""
        _, pooled_left = self.encode(input_ids, attention_mask, pixel_values_left, image_token_type_idx=1)
        _, pooled_right = self.encode(input_ids, attention_mask, pixel_values_right, image_token_type_idx=2)
        return self.classifier(torch.cat([pooled_left, pooled_right], dim=-1))

    def mlm_logits(self, sequence: torch.Tensor, text_len: int) -> torch.Tensor:
        """``(B, T+I, D)`` → ``(B, T, V)`` vocabulary logits at the text positions."""
        return self.mlm_score(sequence[:, :text_len])

    def itm_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` → ``(B, 2)``: [not matched, matched]."""
        return self.itm_score(pooled)

    def classify(self, input_ids, attention_mask, pixel_values) -> torch.Tensor:
        """One joint pass → ``classifier(pooled)``: VQA answer logits ``(B, A)`` or SNLI-VE logits ``(B, 3)``."""
        _, pooled = self.encode(input_ids, attention_mask, pixel_values)
        return self.classifier(pooled)

    def rank_score(self, input_ids, attention_mask, pixel_values) -> torch.Tensor:
        """Image–text retrieval score ``(B, 1)`` from the pooled [CLS]."""
        _, pooled = self.encode(input_ids, attention_mask, pixel_values)
        return self.rank_output(pooled)

    # ------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """``config.json`` (ViltConfig), ``model.safetensors`` (tied weights stored once), ``heads.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(path))
        write_json(path / "heads.json", {"heads": list(self.heads), "tie_mlm_decoder": self.tie_mlm_decoder})
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                 if not (self.tie_mlm_decoder and k == "mlm_score.decoder.weight")}  # tied: stored once
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(state, str(tmp))

    @classmethod
    def load(cls, path: str | Path, heads: tuple[str, ...] | None = None, num_labels: int | None = None) -> "ViltTeacher":
        """Load a teacher saved by :meth:`save`; ``heads`` selects heads (saved ones keep their weights, heads the
        checkpoint lacks start random; ``num_labels`` sizes a new VQA head). A checkpoint that does not fit raises
        naming the keys."""
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no teacher checkpoint (model.safetensors) found")
        config = ViltConfig.from_pretrained(str(path))
        if num_labels is not None:
            config.num_labels = num_labels
        meta = json.loads((path / "heads.json").read_text())
        saved = tuple(meta["heads"])
        model = cls(config, heads or saved, tie_mlm_decoder=meta.get("tie_mlm_decoder", False))
        state = load_file(str(path / "model.safetensors"))
        return model._load_checked(state, saved, str(path))

    @classmethod
    def from_pretrained(cls, source: str | Path, heads: tuple[str, ...] | None = None) -> "ViltTeacher":
        """A transformers ViLT checkpoint (hub id such as ``dandelin/vilt-b32-finetuned-vqa``, or a local
        ``save_pretrained`` directory) as a teacher. The checkpoint's class (``config.architectures``) says which
        heads it holds; their weights must map onto the teacher with no missing and no unexpected keys."""
        import transformers

        config = ViltConfig.from_pretrained(str(source))
        arch = (config.architectures or ["ViltModel"])[0]
        if arch not in HF_ARCHITECTURES:
            raise ValueError(f"{source}: architecture {arch!r} is not a ViLT class the teacher maps "
                             f"(known: {sorted(HF_ARCHITECTURES)})")
        hf_model, info = getattr(transformers, arch).from_pretrained(str(source), output_loading_info=True)
        problems = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise RuntimeError(f"{source}: checkpoint does not fit {arch}: {problems}")
        saved = HF_ARCHITECTURES[arch]
        model = cls(hf_model.config, heads or saved)
        return model._load_checked(hf_model.state_dict(), saved, str(source))

    def _load_checked(self, state: dict[str, torch.Tensor], saved_heads: tuple[str, ...], source: str) -> "ViltTeacher":
        """Load ``state`` keeping only ``vilt`` and the kept heads; fail on any key that does not fit."""
        keep = {"vilt"} | {HEAD_ATTRS[h] for h in self.heads if h in saved_heads}
        state = {k: v for k, v in state.items() if k.split(".")[0] in keep}
        missing, unexpected = self.load_state_dict(state, strict=False)
        new = {HEAD_ATTRS[h] for h in self.heads if h not in saved_heads}
        tied = {"mlm_score.decoder.weight"} if self.tie_mlm_decoder else set()
        missing = [k for k in missing if k.split(".")[0] not in new and k not in tied]
        if missing or unexpected:
            raise RuntimeError(f"{source}: checkpoint does not fit the teacher: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        if self.tie_mlm_decoder:  # re-tie after loading (load_state_dict copies into the shared tensor)
            self.mlm_score.decoder.weight = self.vilt.embeddings.text_embeddings.word_embeddings.weight
        return self
