"""The model card (``README.md`` with the Hugging Face hub's YAML metadata) of an exported student.

Every number in it is read from the pipeline's files by the caller: the evaluation metrics
(``metrics/eval/<task>/<model>.json``), the prepared data's summary (``metrics/data/<task>.json``), the params that
made the model and the measured ONNX parity. Nothing is typed in here but the fixed facts of the base model.
"""

from __future__ import annotations

import json

import yaml

BASE_LICENSE = "apache-2.0"
"""ViLT (dandelin/vilt-b32-*) and its code are released under Apache-2.0; the students are derived works."""
HUB_TASK = {"nlvr2": "visual-reasoning", "snli_ve": "visual-entailment", "vqa": "visual-question-answering",
            "retrieval": "image-text-retrieval"}
OFFICIAL = {"nlvr2": "lil-lab/nlvr", "snli_ve": "HuggingFaceM4/SNLI-VE", "vqa": "HuggingFaceM4/VQAv2",
            "retrieval": "nlphuji/flickr30k"}
"""Hub names of the official releases a paper-scale run reads (``data.<task>.source: official``)."""


def datasets(task: str, source: str) -> list[str]:
    """What the card lists under ``datasets``: the official release's hub name, or the generator's name."""
    if source == "official":
        return [OFFICIAL[task]]
    return ["easy-vqa"] if source == "easy_vqa" else [f"vldistill-shapes-{task}"]


def metadata(name: str, task: str, source: str, metrics: dict[str, dict], base_model: str | None) -> dict:
    """The YAML front matter: licence, library, tags, datasets, base model and a ``model-index`` whose results are
    ``metrics`` (``{split: {metric: value}}``)."""
    results = [{"task": {"type": HUB_TASK[task], "name": task},
                "dataset": {"name": datasets(task, source)[0], "type": datasets(task, source)[0], "split": split},
                "metrics": [{"type": metric, "value": value, "name": f"{split} {metric}"}
                            for metric, value in sorted(values.items())]}
               for split, values in sorted(metrics.items())]
    meta = {"license": BASE_LICENSE, "library_name": "vldistill",
            "tags": ["vilt", "dual-encoder", "knowledge-distillation", "dide", "onnx", task],
            "datasets": datasets(task, source), "model-index": [{"name": name, "results": results}]}
    if base_model:
        meta["base_model"] = base_model
    return meta


def render(name: str, task: str, variant: str, source: str, metrics: dict[str, dict], data_summary: dict,
           params: dict, parity: dict[str, float], examples: int, opset: int, atol: float,
           base_model: str | None) -> str:
    """The whole ``README.md``: front matter, what the model is, how to use it, its data, metrics, params, ONNX."""
    front = yaml.safe_dump(metadata(name, task, source, metrics, base_model), sort_keys=False)
    rows = [f"| {split} | {metric} | {value:.4f} |" for split, values in sorted(metrics.items())
            for metric, value in sorted(values.items())]
    base = base_model or "a ViLT teacher trained from scratch by this pipeline"
    return "\n".join([
        "---", front.rstrip(), "---", "",
        f"# {name}", "",
        f"A DiDE dual encoder (variant `{variant}`) distilled from a ViLT fusion teacher for `{task}`, exported by "
        "vldistill's `export` stage. Text and image towers are separate, so images are encoded once and cached; a "
        "query then costs the text tower, the fusion head and (for retrieval) an inner-product search.", "",
        f"Base model: {base}. Licence: Apache-2.0, as ViLT.", "",
        "## Use", "",
        "```python",
        "from vldistill.deploy.hf import DualEncoderModel",
        "model = DualEncoderModel.from_pretrained('<this directory>')",
        "```", "",
        "or, from the shell: `vldistill index --model <this directory> --images <folder> --out <index>`, then "
        "`vldistill search --index <index> \"a query\"` / `vldistill answer --index <index> --image <name> "
        "\"a question\"`. `onnx/` holds the towers and the head as separate ONNX graphs.", "",
        "## Data", "",
        f"Source: `{source}`. Prepared data summary (`metrics/data/{task}.json`):", "",
        "```json", json.dumps(data_summary, indent=2, sort_keys=True), "```", "",
        "## Evaluation", "",
        f"From `metrics/eval/{task}/{variant}.json`:", "",
        "| split | metric | value |", "|---|---|---|", *rows, "",
        "## Params that made it", "",
        "```yaml", yaml.safe_dump(params, sort_keys=True).rstrip(), "```", "",
        "## ONNX", "",
        f"Opset {opset}; dynamic batch and text length; image size fixed to the training size. Largest "
        f"|onnxruntime − PyTorch| on {examples} test examples (accepted up to {atol:g}):",
        "",
        "| output | max abs diff |", "|---|---|",
        *[f"| {key} | {value:.2e} |" for key, value in sorted(parity.items())], "",
    ])
