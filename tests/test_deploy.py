"""Deployment: the export round trip (HF format, tokenizer, model card, ONNX parity), the image-embedding index
(exact top-k, R@1 as evaluation, resume), search / answer against the cached embeddings and their one-line errors.

One tiny workspace per module: retrieval, SNLI-VE and NLVR2 prepared at a few dozen examples, a tokenizer trained on
them, a random-weight dual student per task saved where ``distill_finetune`` saves it, its evaluation metrics
computed by the pipeline's own code, then ``export_task`` as the ``export`` stage runs it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vldistill import paths
from vldistill.config import load
from vldistill.data import tokenizer as tok
from vldistill.data.datasets import load_split
from vldistill.data.prepared import prepare, read_split
from vldistill.evaluate.metrics import task_metrics
from vldistill.io import read_json, write_json
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import vilt_config

from conftest import tiny_params_text

TASKS = {"retrieval": 1, "snli_ve": 3, "nlvr2": 2}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory laid out as the repository after ``evaluate``, the current directory while the module runs."""
    root = tmp_path_factory.mktemp("deploy")
    before = os.getcwd()
    os.chdir(root)
    raw = yaml.safe_load(tiny_params_text())
    raw["tasks"] = list(TASKS)
    raw["runs"] = {f"{task}-dide": {"task": task, "variant": "dide"} for task in TASKS}
    raw["ablation"].update(variants=[], tables={})
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load(root / "params.yaml")
    for task in TASKS:
        prepare(task, getattr(params.data, task), params.data.scene, 0, paths.PREPARED, paths.data_metrics(task))
    texts = [t for task in TASKS for t in read_split(paths.PREPARED, task, "train")["text"]]
    tokenizer = tok.train_tokenizer(texts, params.tokenizer.vocab_size, params.teacher.max_text_len)
    tok.save(tokenizer, paths.TOKENIZER)
    image_size = np.load(paths.PREPARED / "retrieval" / "images.npy", mmap_mode="r").shape[1]
    config = vilt_config(params.teacher, image_size, len(tokenizer))
    torch.manual_seed(0)
    for task, outputs in TASKS.items():
        student = DualEncoder(config, params.student.fusion_hidden, task=task, num_outputs=outputs).eval()
        student.save(paths.model_dir("distill_finetune", task, "dide"))
        split = load_split(paths.PREPARED, task, "test", tokenizer, params.teacher.max_text_len,
                           params.teacher.pixel_norm)
        write_json(paths.eval_metrics(task, "dide"), {"test": task_metrics(student, split, task)})
    yield root, params
    os.chdir(before)


@pytest.fixture(scope="module")
def exports(workspace):
    from vldistill.deploy.run import EXPORTS, export_task

    _, params = workspace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = {task: export_task(params, task)["dide"] for task in TASKS}
    return {task: EXPORTS / task / "dide" for task in TASKS}, infos


def test_export_round_trips_through_from_pretrained(workspace, exports):
    from transformers import AutoTokenizer

    from vldistill.deploy.hf import DualEncoderModel

    _, params = workspace
    dirs, _ = exports
    for task in TASKS:
        student = DualEncoder.load(paths.model_dir("distill_finetune", task, "dide"))
        model = DualEncoderModel.from_pretrained(str(dirs[task])).eval()
        original, loaded = student.state_dict(), model.dual.state_dict()
        assert original.keys() == loaded.keys()
        assert all(torch.equal(original[k], loaded[k]) for k in original)
        split = load_split(paths.PREPARED, task, "test", AutoTokenizer.from_pretrained(str(dirs[task])),
                           params.teacher.max_text_len, params.teacher.pixel_norm)
        assert task_metrics(model.dual, split, task) == task_metrics(student, split, task)
        assert model.config.image_size == list(split.images.shape[1:3])
    snli = DualEncoderModel.from_pretrained(str(dirs["snli_ve"])).config.id2label
    frame = read_split(paths.PREPARED, "snli_ve", "test")
    assert all(snli[label] == name for label, name in zip(frame["label"], frame["label_name"]))


def test_onnx_graphs_match_pytorch_on_prepared_examples(workspace, exports):
    """Every output of the three graphs within deploy.export.atol of PyTorch, on test examples the export did not
    see, at another batch size and a shorter text length than the export traced with."""
    from vldistill.deploy.onnx_towers import OnnxRunner, TorchRunner

    _, params = workspace
    dirs, infos = exports
    atol = params.deploy.export.atol
    for task in TASKS:
        assert max(infos[task]["parity"].values()) <= atol
        tokenizer = tok.load(paths.TOKENIZER)
        split = load_split(paths.PREPARED, task, "test", tokenizer, params.teacher.max_text_len,
                           params.teacher.pixel_norm)
        batch = split.collate(list(range(3, 8)))
        pixels = batch.get("pixel_values", batch.get("pixel_values_right")).numpy()
        ids, mask = batch["input_ids"][:, :12].numpy(), batch["attention_mask"][:, :12].numpy()
        eager, onnx = TorchRunner(DualEncoder.load(paths.model_dir("distill_finetune", task, "dide"))), \
            OnnxRunner(dirs[task] / "onnx")
        for a, b in zip(eager.text(ids, mask) + eager.image(pixels), onnx.text(ids, mask) + onnx.image(pixels)):
            np.testing.assert_allclose(b, a, rtol=0, atol=atol)
        cls = [eager.text(ids, mask)[0], eager.image(pixels)[0]] + ([eager.image(pixels, 2)[0]]
                                                                     if task == "nlvr2" else [])
        np.testing.assert_allclose(onnx.head(*cls), eager.head(*cls), rtol=0, atol=atol)
        assert np.abs(eager.image(pixels, 2)[0] - eager.image(pixels, 1)[0]).max() > 0  # the type input matters


def test_model_card_metadata_comes_from_the_pipeline_files(workspace, exports):
    dirs, infos = exports
    for task in TASKS:
        text = (dirs[task] / "README.md").read_text()
        front = yaml.safe_load(text.split("---")[1])
        assert front["license"] == "apache-2.0"
        metrics = read_json(paths.eval_metrics(task, "dide"))
        results = front["model-index"][0]["results"]
        assert {(r["dataset"]["split"], m["type"]): m["value"] for r in results for m in r["metrics"]} == \
            {(split, k): v for split, values in metrics.items() for k, v in values.items()}
        assert str(read_json(paths.data_metrics(task))["image_store"]["images"]) in text
        assert infos[task] == read_json(dirs[task] / "vldistill.json")
