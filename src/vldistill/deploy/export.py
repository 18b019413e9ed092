"""One exported student: an HF-format directory that ``DualEncoderModel.from_pretrained`` opens, with its tokenizer,
its model card, the ONNX graphs of its towers and head (checked against PyTorch before the directory appears) and
``vldistill.json``, the export's facts (fingerprint of the weights, task, image size, parity).

Layout of ``models/export/<task>/<variant>/``::

    config.json  model.safetensors  tokenizer.json ...  README.md  vldistill.json  onnx/{text,image,head}.onnx
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from vldistill.config import ExportParams
from vldistill.deploy import card
from vldistill.deploy.hf import DualEncoderModel
from vldistill.deploy.onnx_towers import export_onnx, parity
from vldistill.io import atomic_dir, read_json, write_json
from vldistill.models.dual import DualEncoder

INFO = "vldistill.json"


def fingerprint(directory: str | Path) -> str:
    """``sha256:<hex>`` of the directory's ``model.safetensors``: what an index records to refuse another model."""
    digest = hashlib.sha256()
    with open(Path(directory) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def read_info(directory: str | Path) -> dict:
    """The export's ``vldistill.json``; one clear line when ``directory`` is not an export."""
    path = Path(directory) / INFO
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a vldistill export (no {INFO}; run `dvc repro export@<task>`)")
    return read_json(path)


def label_names(frame, task: str, answers: list[str] | None = None) -> dict[int, str] | None:
    """``id2label`` of the task head: the VQA answer vocabulary, the ``(label, label_name)`` pairs of a prepared
    split (nlvr2, snli_ve), none for retrieval (its head is image–text matching)."""
    if task == "vqa":
        return dict(enumerate(answers))
    if "label_name" in frame:
        return {int(k): str(v) for k, v in sorted(set(zip(frame["label"], frame["label_name"])))}
    return None


def parity_batch(split, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` examples of a prepared split as ``input_ids``, ``attention_mask``, ``pixel_values`` (NLVR2:
    its left images)."""
    batch = split.collate(list(range(min(n, len(split)))))
    if "pixel_values" not in batch:
        batch["pixel_values"] = batch["pixel_values_left"]
    return batch


def export_student(student_dir: str | Path, out: str | Path, tokenizer, batch: dict[str, torch.Tensor], *,
                   task: str, variant: str, pixel_norm: str, max_text_len: int, labels: dict[int, str] | None,
                   metrics: dict, data_summary: dict, params: dict, source: str, base_model: str | None,
                   knobs: ExportParams) -> dict:
    """Write the export of the dual student saved at ``student_dir`` into ``out`` (replaced whole, atomically).

    The ONNX graphs are run on ``batch`` (:func:`parity_batch`) and compared with PyTorch: an output further than
    ``knobs.atol`` fails the export with one line naming it. Returns the ``vldistill.json`` written."""
    dual = DualEncoder.load(student_dir)
    if dual.task != task:
        raise ValueError(f"{student_dir}: a {dual.task} student, expected {task}")
    image_size = list(batch["pixel_values"].shape[-2:])
    model = DualEncoderModel.from_dual(dual, image_size=image_size, pixel_norm=pixel_norm, max_text_len=max_text_len,
                                       id2label=labels)
    name = f"vldistill-{task}-{variant}"
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        export_onnx(model.dual, tmp / "onnx", image_size, max_text_len, knobs.opset)
        diffs = parity(model.dual, tmp / "onnx", batch)
        worst = max(diffs, key=diffs.get)
        if diffs[worst] > knobs.atol:
            raise ValueError(f"{out}: ONNX {worst} differs from PyTorch by {diffs[worst]:.2e} > "
                             f"deploy.export.atol={knobs.atol:g}")
        (tmp / "README.md").write_text(card.render(name, task, variant, source, metrics, data_summary, params, diffs,
                                                   len(batch["input_ids"]), knobs.opset, knobs.atol, base_model))
        info = {"name": name, "task": task, "variant": variant, "fingerprint": fingerprint(tmp),
                "image_size": image_size, "pixel_norm": pixel_norm, "max_text_len": max_text_len,
                "opset": knobs.opset, "parity": diffs, "parity_examples": len(batch["input_ids"]),
                "onnx": {"text": "onnx/text.onnx", "image": "onnx/image.onnx", "head": "onnx/head.onnx"}}
        write_json(tmp / INFO, info)
    return info
