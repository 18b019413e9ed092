"""The dual encoder as three ONNX graphs, and the same three calls on PyTorch and on onnxruntime.

- ``text.onnx``: ``input_ids, attention_mask (B, T) int64`` → ``text_cls (B, D)``, ``text_embeds (B, D)``;
- ``image.onnx``: ``pixel_values (B, 3, H, W) float32``, ``image_token_type () int64`` (1; NLVR2's second image 2)
  → ``image_cls (B, D)``, ``image_embeds (B, D)``;
- ``head.onnx``: the fusion MLP and the task head over tower [CLS] vectors: ``text_cls, image_cls (B, D)`` (NLVR2:
  also ``image2_cls``) → ``logits (B, C)``; retrieval models export their ITM head (``C = 2``).

``*_embeds`` are the unit-norm retrieval embeddings (``text_proj`` / ``image_proj``), what a FAISS index holds;
``*_cls`` feed the head, so an image encoded once answers any later question. Batch and text length are dynamic
axes; the image size is the one the model was trained at. Exported with torch's TorchScript-based exporter
(``dynamo=False``: no onnxscript dependency, and these graphs have no data-dependent control flow).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vldistill.models.dual import DualEncoder

FILES = {"text": "text.onnx", "image": "image.onnx", "head": "head.onnx"}


class TextGraph(nn.Module):
    def __init__(self, dual: DualEncoder):
        super().__init__()
        self.dual = dual

    def forward(self, input_ids, attention_mask):
        cls = self.dual.encode_text(input_ids, attention_mask).cls
        return cls, nn.functional.normalize(self.dual.text_proj(cls), dim=-1)


class ImageGraph(nn.Module):
    def __init__(self, dual: DualEncoder):
        super().__init__()
        self.dual = dual

    def forward(self, pixel_values, image_token_type):
        cls = self.dual.encode_image(pixel_values, image_token_type).cls
        return cls, nn.functional.normalize(self.dual.image_proj(cls), dim=-1)


class HeadGraph(nn.Module):
    def __init__(self, dual: DualEncoder):
        super().__init__()
        self.dual = dual

    def forward(self, text_cls, image_cls, image2_cls=None):
        if self.dual.task == "nlvr2":
            return self.dual.nlvr2_from_cls(text_cls, image_cls, image2_cls)
        if self.dual.classifier is None:  # retrieval: image–text matching logits
            return self.dual.itm_score(self.dual.fuse(text_cls, image_cls))
        return self.dual.classify_from_cls(text_cls, image_cls)


def head_inputs(task: str) -> list[str]:
    return ["text_cls", "image_cls", "image2_cls"] if task == "nlvr2" else ["text_cls", "image_cls"]


def export_onnx(dual: DualEncoder, out: str | Path, image_size: list[int], text_len: int, opset: int) -> dict[str, str]:
    """Write the three graphs of ``dual`` (eval mode) into ``out``; returns ``{graph: file name}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dual = dual.eval()
    d = dual.config.hidden_size
    ids = torch.full((2, text_len), 5, dtype=torch.long)
    batch, text = {0: "batch"}, {0: "batch", 1: "text_len"}
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer notes that the image tower's shape checks (channels, patch grid) are frozen: the image size is
        # fixed by design; and that this exporter is the TorchScript one, chosen above
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(TextGraph(dual), (ids, torch.ones_like(ids)), str(out / FILES["text"]), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["text_cls", "text_embeds"],
                          dynamic_axes={"input_ids": text, "attention_mask": text, "text_cls": batch,
                                        "text_embeds": batch}, opset_version=opset)
        torch.onnx.export(ImageGraph(dual), (torch.zeros(2, 3, *image_size), torch.tensor(1)),
                          str(out / FILES["image"]), dynamo=False,
                          input_names=["pixel_values", "image_token_type"], output_names=["image_cls", "image_embeds"],
                          dynamic_axes={"pixel_values": batch, "image_cls": batch, "image_embeds": batch},
                          opset_version=opset)
        names = head_inputs(dual.task)
        torch.onnx.export(HeadGraph(dual), tuple(torch.zeros(2, d) for _ in names), str(out / FILES["head"]),
                          dynamo=False, input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: batch for n in names}, "logits": batch}, opset_version=opset)
    return dict(FILES)


class TorchRunner:
    """The three calls on PyTorch (eval mode, no grad), numpy in and out, as :class:`OnnxRunner`."""

    def __init__(self, dual: DualEncoder):
        self.dual = dual.eval()
        self.text_graph, self.image_graph, self.head_graph = TextGraph(dual), ImageGraph(dual), HeadGraph(dual)

    @torch.no_grad()
    def text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cls, emb = self.text_graph(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return cls.numpy(), emb.numpy()

    @torch.no_grad()
    def image(self, pixel_values: np.ndarray, token_type: int = 1) -> tuple[np.ndarray, np.ndarray]:
        cls, emb = self.image_graph(torch.from_numpy(pixel_values), token_type)
        return cls.numpy(), emb.numpy()

    @torch.no_grad()
    def head(self, *cls: np.ndarray) -> np.ndarray:
        return self.head_graph(*(torch.from_numpy(c) for c in cls)).numpy()


class OnnxRunner:
    """The three graphs of an export's ``onnx/`` directory on onnxruntime's CPU provider."""

    def __init__(self, directory: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.sessions = {name: ort.InferenceSession(str(Path(directory) / file), options,
                                                    providers=["CPUExecutionProvider"])
                         for name, file in FILES.items()}
        self.head_names = [i.name for i in self.sessions["head"].get_inputs()]

    def text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.sessions["text"].run(None, {"input_ids": input_ids.astype(np.int64),
                                                      "attention_mask": attention_mask.astype(np.int64)}))

    def image(self, pixel_values: np.ndarray, token_type: int = 1) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self.sessions["image"].run(None, {"pixel_values": pixel_values.astype(np.float32),
                                                       "image_token_type": np.array(token_type, dtype=np.int64)}))

    def head(self, *cls: np.ndarray) -> np.ndarray:
        return self.sessions["head"].run(None, dict(zip(self.head_names, cls)))[0]


def parity(dual: DualEncoder, directory: str | Path, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest ``|onnxruntime − PyTorch|`` of every graph output on ``batch`` (``input_ids``, ``attention_mask``,
    ``pixel_values`` ``(B, ...)``; NLVR2's second image is the same pixels at token type 2)."""
    eager, onnx = TorchRunner(dual), OnnxRunner(directory)
    ids, mask, pixels = (batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values"))
    out = {}
    pairs = {"text": (eager.text(ids, mask), onnx.text(ids, mask)),
             "image": (eager.image(pixels, 1), onnx.image(pixels, 1))}
    if dual.task == "nlvr2":
        pairs["image2"] = (eager.image(pixels, 2), onnx.image(pixels, 2))
    for graph, (a, b) in pairs.items():
        out[f"{graph}_cls"] = float(np.abs(a[0] - b[0]).max())
        out[f"{graph}_embeds"] = float(np.abs(a[1] - b[1]).max())
    cls = [pairs["text"][0][0], pairs["image"][0][0]] + ([pairs["image2"][0][0]] if dual.task == "nlvr2" else [])
    out["logits"] = float(np.abs(eager.head(*cls) - onnx.head(*cls)).max())
    return out
