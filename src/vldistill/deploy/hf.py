"""The dual encoder in transformers' format: ``DualEncoderConfig`` + ``DualEncoderModel``, so that an exported student
is a directory ``DualEncoderModel.from_pretrained`` (and ``save_pretrained``, ``push_to_hub``) understands.

The model wraps :class:`vldistill.models.dual.DualEncoder` unchanged (its weights live under ``dual.``); the config
holds the towers' ``ViltConfig`` as a dict, the fusion width, the task, the label names (``id2label``) and the
image size and pixel normalisation the model was trained with, which a user needs to feed it new images.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel, ViltConfig
from transformers import initialization as init
from transformers.models.vilt.modeling_vilt import TextEmbeddings

from vldistill.models.dual import DualEncoder


class DualEncoderConfig(PretrainedConfig):
    """``vilt`` (the towers' ViltConfig as a dict), ``fusion_hidden``, ``task``, ``num_outputs``, ``image_size``
    ``[H, W]`` and ``pixel_norm`` (``unit`` | ``vilt``, see :func:`vldistill.data.datasets.to_pixels`)."""

    model_type = "vldistill_dual"

    def __init__(self, vilt: dict | None = None, fusion_hidden: int = 256, task: str = "retrieval",
                 num_outputs: int = 1, image_size: list[int] | None = None, pixel_norm: str = "unit",
                 max_text_len: int = 40, **kwargs):
        self.vilt = dict(vilt or ViltConfig().to_dict())
        self.fusion_hidden, self.task, self.num_outputs = fusion_hidden, task, num_outputs
        self.image_size = list(image_size or [self.vilt["image_size"]] * 2)
        self.pixel_norm, self.max_text_len = pixel_norm, max_text_len
        super().__init__(**kwargs)

    @property
    def vilt_config(self) -> ViltConfig:
        return ViltConfig(**{k: v for k, v in self.vilt.items() if k not in ("transformers_version", "model_type")})


class DualEncoderModel(PreTrainedModel):
    """A :class:`DualEncoder` behind transformers' loading and saving. ``forward`` returns the normalised retrieval
    embeddings; the towers and heads are reached as in the pipeline, through ``model.dual``."""

    config_class = DualEncoderConfig
    base_model_prefix = "dual"
    main_input_name = "input_ids"

    def __init__(self, config: DualEncoderConfig):
        super().__init__(config)
        self.dual = DualEncoder(config.vilt_config, config.fusion_hidden, task=config.task,
                                num_outputs=config.num_outputs)
        self.post_init()

    def _init_weights(self, module) -> None:
        """Weights come from a trained checkpoint (``from_pretrained``) or :meth:`from_dual`; only the text
        embeddings' non-persistent index buffers are (re)made here, as ``ViltPreTrainedModel`` does."""
        if isinstance(module, TextEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)

    @classmethod
    def from_dual(cls, dual: DualEncoder, **config) -> "DualEncoderModel":
        """Wrap a trained dual encoder (its weights copied); ``config``: ``image_size``, ``pixel_norm``,
        ``max_text_len``, ``id2label`` ... of :class:`DualEncoderConfig`."""
        cfg = DualEncoderConfig(vilt=dual.config.to_dict(), fusion_hidden=dual.fusion_hidden, task=dual.task,
                                num_outputs=dual.num_outputs, **config)
        model = cls(cfg)
        model.dual.load_state_dict(dual.state_dict())
        return model.eval()

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` → unit-norm retrieval embeddings ``(B, D)``."""
        cls = self.dual.encode_text(input_ids, attention_mask).cls
        return torch.nn.functional.normalize(self.dual.text_proj(cls), dim=-1)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` → unit-norm retrieval embeddings ``(B, D)``."""
        cls = self.dual.encode_image(pixel_values).cls
        return torch.nn.functional.normalize(self.dual.image_proj(cls), dim=-1)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None) -> dict[str, torch.Tensor]:
        """``{"text_embeds" (B, D), "image_embeds" (B, D)}`` for whichever inputs are given."""
        out = {}
        if input_ids is not None:
            out["text_embeds"] = self.text_embeds(input_ids, attention_mask)
        if pixel_values is not None:
            out["image_embeds"] = self.image_embeds(pixel_values)
        return out
