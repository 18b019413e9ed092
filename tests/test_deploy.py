"""Deployment: the export round trip (HF format, tokenizer, model card, ONNX parity), the image-embedding index
(exact top-k, R@1 as evaluation, resume), search / answer against the cached embeddings and their one-line errors.

One tiny workspace per module: retrieval, SNLI-VE and NLVR2 prepared at a few dozen examples, a tokenizer trained on
them, a random-weight dual student per task and seed of :data:`SEEDS` saved where ``distill_finetune`` saves that
seed's replica, its evaluation metrics computed by the pipeline's own code, then ``export_task`` as the ``export``
stage runs it (which exports the replica of the first seed).
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
from vldistill.data.prepared import prepare, read_answers, read_split
from vldistill.evaluate.metrics import task_metrics
from vldistill.io import read_json, write_json
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import vilt_config

from conftest import ROOT, tiny_params_text

TASKS = {"retrieval": 1, "snli_ve": 3, "nlvr2": 2, "vqa": None}  # task → head width (VQA: its answers)
SEEDS = [1, 0]
"""``seeds`` of the workspace: the first (exported) is not the smallest; seed 0's replica has other weights."""
LEAD, OTHER = SEEDS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory laid out as the repository after ``evaluate``, the current directory while the module runs."""
    root = tmp_path_factory.mktemp("deploy")
    before = os.getcwd()
    os.chdir(root)
    raw = yaml.safe_load(tiny_params_text())
    raw["tasks"] = list(TASKS)
    raw["runs"] = {f"{task}-dide": {"task": task, "variant": "dide"} for task in TASKS}
    raw["ablation"].update(tables={})
    raw["seeds"] = SEEDS
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
        outputs = outputs or len(read_answers(paths.PREPARED, task))
        split = load_split(paths.PREPARED, task, "test", tokenizer, params.teacher.max_text_len,
                           params.teacher.pixel_norm)
        for seed in SEEDS:
            student = DualEncoder(config, params.student.fusion_hidden, task=task, num_outputs=outputs).eval()
            student.save(paths.replica_dir(task, "dide", seed))
            write_json(paths.eval_metrics(task, paths.replica_name("dide", seed)),
                       {"test": task_metrics(student, split, task)})
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
        student = DualEncoder.load(paths.replica_dir(task, "dide", LEAD))
        model = DualEncoderModel.from_pretrained(str(dirs[task])).eval()
        original, loaded = student.state_dict(), model.dual.state_dict()
        assert original.keys() == loaded.keys()
        assert all(torch.equal(original[k], loaded[k]) for k in original)
        other = DualEncoder.load(paths.replica_dir(task, "dide", OTHER)).state_dict()
        assert not all(torch.equal(other[k], loaded[k]) for k in other)  # the first seed's replica, not another's
        split = load_split(paths.PREPARED, task, "test", AutoTokenizer.from_pretrained(str(dirs[task])),
                           params.teacher.max_text_len, params.teacher.pixel_norm)
        assert task_metrics(model.dual, split, task) == task_metrics(student, split, task)
        assert model.config.image_size == list(split.images.shape[1:3])
    snli = DualEncoderModel.from_pretrained(str(dirs["snli_ve"])).config.id2label
    frame = read_split(paths.PREPARED, "snli_ve", "test")
    assert all(snli[label] == name for label, name in zip(frame["label"], frame["label_name"]))
    vqa = DualEncoderModel.from_pretrained(str(dirs["vqa"])).config.id2label
    assert [vqa[i] for i in range(len(vqa))] == read_answers(paths.PREPARED, "vqa")


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
        eager, onnx = TorchRunner(DualEncoder.load(paths.replica_dir(task, "dide", LEAD))), \
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
        metrics = read_json(paths.eval_metrics(task, paths.replica_name("dide", LEAD)))
        assert metrics != read_json(paths.eval_metrics(task, paths.replica_name("dide", OTHER)))
        results = front["model-index"][0]["results"]
        assert {(r["dataset"]["split"], m["type"]): m["value"] for r in results for m in r["metrics"]} == \
            {(split, k): v for split, values in metrics.items() for k, v in values.items()}
        assert f"\nseed: {LEAD}\n" in text  # the card's params name the seed of the exported replica
        assert str(read_json(paths.data_metrics(task))["image_store"]["images"]) in text
        assert infos[task] == read_json(dirs[task] / "vldistill.json")


# ----------------------------------------------------------------------------------------------- index and queries
def _index(export_dir: Path, task: str, out: Path, **kw) -> dict:
    from vldistill.deploy.cli import Export
    from vldistill.deploy.images import open_source
    from vldistill.deploy.index import build_index

    export = Export(export_dir)
    source = open_source(paths.PREPARED / task, export.config.image_size, export.config.pixel_norm, "test")
    return build_index(export.runner, source, out, model_dir=export_dir, info=export.info, progress=False, **kw)


@pytest.fixture(scope="module")
def indexes(workspace, exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("indexes")
    dirs, _ = exports
    for task in TASKS:
        _index(dirs[task], task, root / task, batch_size=8)
    return root


def test_exact_index_returns_brute_force_top_k_and_evaluations_r1(workspace, exports, indexes):
    """Searching every test caption: FAISS's top 5 are the 5 best images of the pipeline's own score matrix, and the
    caption's own image comes first as often as evaluation's IR R@1 says."""
    from vldistill.deploy.cli import Export
    from vldistill.deploy.index import ImageIndex
    from vldistill.evaluate.metrics import gallery, retrieval_scores

    _, params = workspace
    dirs, _ = exports
    export, index = Export(dirs["retrieval"]), ImageIndex(indexes / "retrieval")
    split = load_split(paths.PREPARED, "retrieval", "test", export.tokenizer, params.teacher.max_text_len,
                       params.teacher.pixel_norm)
    ranked = retrieval_scores(export.runner.dual, split)
    scores, text_image, groups = ranked.ir, ranked.text_image, ranked.text_groups
    rows, keys, _ = gallery(split)
    assert index.names == [str(k) for k in keys.tolist()]
    queries = np.concatenate([export.encode_text(split.texts[r])[1] for r in rows])
    found_scores, found = index.search(queries, 5)
    best = scores.topk(5, dim=1)
    cosine = best.values.numpy() / export.runner.dual.logit_scale.exp().item()
    np.testing.assert_allclose(found_scores, cosine, atol=1e-5)
    clear = np.diff(-cosine, axis=1) > 1e-5  # ranks not decided by float noise
    assert (found[:, :-1] == best.indices.numpy()[:, :-1])[clear].all() and found[:, 0].tolist() == \
        best.indices[:, 0].tolist()
    described = {(g, i) for g, i in zip(groups.tolist(), text_image.tolist())}
    hits = np.mean([(g, top) in described for g, top in zip(groups.tolist(), found[:, 0].tolist())])
    assert hits == pytest.approx(read_json(paths.eval_metrics("retrieval", paths.replica_name("dide", LEAD)))
                                 ["test"]["ir_r1"])


@pytest.mark.parametrize("task", ["snli_ve", "nlvr2", "vqa"])
def test_answer_equals_the_pipelines_prediction(workspace, exports, indexes, task):
    from vldistill.deploy.cli import Export, answer_scores
    from vldistill.deploy.index import ImageIndex
    from vldistill.evaluate.predictions import predictions

    _, params = workspace
    dirs, _ = exports
    index = ImageIndex(indexes / task)
    split = load_split(paths.PREPARED, task, "test", tok.load(paths.TOKENIZER), params.teacher.max_text_len,
                       params.teacher.pixel_norm)
    student = DualEncoder.load(paths.replica_dir(task, "dide", LEAD))
    if task == "vqa":
        vqa = {"question_ids": read_split(paths.PREPARED, task, "test")["question_id"].tolist(),
               "answers": read_answers(paths.PREPARED, task)}
        expected = [p["answer"] for p in predictions(student, split, task, **vqa)]
    else:
        expected = [p["label"] for p in predictions(student, split, task)]
    columns = ["image_left", "image_right"] if task == "nlvr2" else ["image"]
    for runtime in ("torch", "onnx"):
        export = Export(dirs[task], runtime)
        got = [int(answer_scores(export, index, split.texts[i],
                                 [str(int(split.columns[c][i])) for c in columns]).argmax()) for i in range(12)]
        if task == "vqa":
            got = [export.config.id2label[a] for a in got]
        assert got == expected[:12]


def test_interrupted_index_resumes_to_the_same_index(exports, tmp_path, monkeypatch):
    from vldistill.deploy.onnx_towers import TorchRunner

    dirs, _ = exports
    whole = _index(dirs["nlvr2"], "nlvr2", tmp_path / "whole", batch_size=4)
    real, calls = TorchRunner.image, []

    def failing(self, pixels, token_type=1):
        calls.append(token_type)
        if len(calls) == 5:  # the third batch's first image pass
            raise KeyboardInterrupt
        return real(self, pixels, token_type)

    monkeypatch.setattr(TorchRunner, "image", failing)
    with pytest.raises(KeyboardInterrupt):
        _index(dirs["nlvr2"], "nlvr2", tmp_path / "resumed", batch_size=4)
    assert read_json(tmp_path / "resumed" / "progress.json")["done"] == 8
    assert not (tmp_path / "resumed" / "index.json").exists()
    calls.clear()
    monkeypatch.setattr(TorchRunner, "image", lambda self, *a: calls.append(1) or real(self, *a))
    resumed = _index(dirs["nlvr2"], "nlvr2", tmp_path / "resumed", batch_size=4)
    assert len(calls) == 2 * (-(-whole["count"] // 4) - 2)  # only the batches after the first two: two passes each
    assert {k: v for k, v in resumed.items() if k != "model"} == {k: v for k, v in whole.items() if k != "model"}
    for name in ("image_embeds.npy", "image_cls.npy", "image2_cls.npy", "index.faiss", "images.csv"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    calls.clear()  # a finished index asked for another FAISS kind: no image is encoded again
    assert _index(dirs["nlvr2"], "nlvr2", tmp_path / "resumed", batch_size=4, kind="hnsw")["faiss"] == "hnsw"
    assert not calls and (tmp_path / "whole" / "index.faiss").read_bytes() != \
        (tmp_path / "resumed" / "index.faiss").read_bytes()


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from vldistill.deploy.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_search_and_answer_print_their_results(exports, indexes, capsys):
    dirs, _ = exports
    split = read_split(paths.PREPARED, "retrieval", "test")
    code, out, _ = _cli(capsys, "search", "--index", indexes / "retrieval", split["text"][0], "-k", "3")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["rank", "score", "image"] and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    scores = [float(line.split()[1]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True)
    frame = read_split(paths.PREPARED, "snli_ve", "test")
    code, out, _ = _cli(capsys, "answer", "--index", indexes / "snli_ve", "--image", frame["image"][0],
                        frame["text"][0], "--runtime", "onnx")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert code == 0 and {r[1] for r in rows} <= set(frame["label_name"]) and len(rows) == 3
    assert sum(float(r[0]) for r in rows) == pytest.approx(1.0, abs=1e-3)


def test_folder_of_image_files_indexes_like_the_store(exports, tmp_path, capsys):
    from PIL import Image

    from vldistill.data.datasets import to_pixels
    from vldistill.deploy.images import open_source

    dirs, _ = exports
    store = np.load(paths.PREPARED / "retrieval" / "images.npy")
    for key in (3, 1, 2):
        Image.fromarray(store[key]).save(tmp_path / f"img{key}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    code, out, _ = _cli(capsys, "index", "--model", dirs["retrieval"], "--images", tmp_path, "--out",
                        tmp_path / "idx")
    assert code == 0 and "3 images" in out
    source = open_source(tmp_path, [store.shape[1], store.shape[2]], "unit")
    assert source.names == ["img1.png", "img2.png", "img3.png"]
    assert torch.equal(source.pixels(0, 3), to_pixels(torch.from_numpy(store[[1, 2, 3]]), "unit"))


def test_bad_input_gets_one_line(exports, indexes, tmp_path, capsys):
    dirs, _ = exports
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "half.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        (("search", "--index", indexes / "retrieval", "   "), "the text is empty"),
        (("answer", "--index", indexes / "snli_ve", "--image", "no-such-image", "is it red?"), "not in the index"),
        (("search", "--index", indexes / "retrieval", "a circle", "--model", dirs["snli_ve"]),
         "not the model the index was built with"),
        (("answer", "--index", indexes / "nlvr2", "--image", "0", "both are red"), "takes 2 image(s)"),
        (("answer", "--index", indexes / "retrieval", "--image", "0", "red?"), "no answer head"),
        (("search", "--index", tmp_path, "a circle"), "not a finished vldistill index"),
        (("index", "--model", tmp_path, "--images", paths.PREPARED / "retrieval", "--out", tmp_path / "i"),
         "not a vldistill export"),
        (("index", "--model", dirs["retrieval"], "--images", tmp_path / "missing", "--out", tmp_path / "i"),
         "no such directory"),
        (("index", "--model", dirs["retrieval"], "--images", broken, "--out", tmp_path / "i"), "cannot decode image"),
        (("index", "--model", dirs["snli_ve"], "--images", paths.PREPARED / "retrieval", "--split", "test",
          "--out", indexes / "retrieval"), "holds an index of another model"),
    ]
    for argv, message in cases:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith(f"vldistill {argv[0]}: error: ") and message in err, (argv, err)


def test_help_names_every_command(capsys):
    code, out, _ = _cli(capsys, "--help")
    assert code == 0 and all(command in out for command in ("index", "search", "answer"))
    code, out, _ = _cli(capsys, "index", "--help")
    assert code == 0 and "--images" in out and "interrupted" in out


# ------------------------------------------------------------------------------------------------------ benchmark
def test_deploy_benchmark_measures_towers_faiss_and_the_cached_query(tmp_path):
    """The tiny params' benchmark: every table filled, exact search its own reference, the approximate index's
    recall a fraction, the query's gain its parts' ratio, the teacher's side marked extrapolated."""
    from vldistill.bench.deploy import run, summary_lines, synthetic_gallery

    params_path = tmp_path / "params.yaml"
    params_path.write_text(tiny_params_text())
    params = load(params_path)
    bench = params.deploy.bench
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run(params, tmp_path / "bench" / "deploy.json")
    assert result == read_json(tmp_path / "bench" / "deploy.json")
    assert set(result["towers"]) == {"embedded", "paper"} == set(result["query"])
    for graphs in result["towers"].values():
        for sizes in graphs.values():
            assert set(sizes) == {str(b) for b in bench.batch_sizes}
            assert all(row["onnx_ms"] > 0 and row["speedup"] == pytest.approx(row["torch_ms"] / row["onnx_ms"])
                       for row in sizes.values())
    assert set(result["faiss"]) == {str(n) for n in bench.gallery_sizes}
    for row in result["faiss"].values():
        assert row["exact"]["recall_at_10"] == 1.0 and 0.0 <= row["approx"]["recall_at_10"] <= 1.0
        assert row["exact"]["qps"] > 0 and row["approx"]["kind"] == bench.approx
    query = result["query"]["embedded"]
    assert query["gallery"] == max(bench.gallery_sizes) and "teacher_s" in query["extrapolated"]
    assert query["teacher_s"] == pytest.approx(query["gallery"] * query["teacher_pair_ms"] / 1000)
    assert query["gain_exact"] == pytest.approx(query["teacher_s"] * 1000 / query["dual_exact_ms"])
    assert len(summary_lines(result)) == 3 + sum(len(s) for g in result["towers"].values() for s in g.values()) \
        + len(result["faiss"]) + len(result["query"])
    gallery = synthetic_gallery(500, 16)
    np.testing.assert_allclose(np.linalg.norm(gallery, axis=1), 1.0, rtol=1e-5)


def test_deploy_report_tables_and_figure_read_the_benchmark_file(tmp_path):
    from vldistill.report import figures, tables

    row = {"torch_ms": 2.0, "onnx_ms": 0.5, "speedup": 4.0}
    faiss_row = {"memory_mb": 4.0, "exact": {"kind": "flat", "build_s": 0.01, "qps": 900.0, "recall_at_10": 1.0},
                 "approx": {"kind": "ivf", "build_s": 0.2, "qps": 9000.0, "recall_at_10": 0.875}}
    query = {"gallery": 1_000_000, "tokenise_ms": 0.1, "text_torch_ms": 2.0, "text_onnx_ms": 0.5,
             "search_exact_ms": 30.0, "search_approx_ms": 0.4, "teacher_pair_ms": 3.0, "teacher_s": 3000.0,
             "dual_exact_ms": 30.6, "dual_approx_ms": 1.0, "gain_exact": 98039.2, "gain_approx": 3e6,
             "extrapolated": ["teacher_s", "search_exact_ms"]}
    bench = {"towers": {"embedded": {g: {"4": row, "32": row} for g in ("head", "image", "text")}},
             "faiss": {"10000": faiss_row, "100000": faiss_row}, "query": {"paper": query}}
    write_json(tmp_path / "bench" / "deploy.json", bench)
    built = tables.deploy_tables(tmp_path)
    assert len(built["towers"]) == 6 and (built["towers"]["speed-up"] == "4.0×").all()
    assert list(zip(built["towers"]["graph"], built["towers"]["batch"])) == [
        (g, b) for g in ("text", "image", "head") for b in ("4", "32")]
    assert list(built["faiss"]["gallery"]) == ["10,000", "100,000"]
    assert (built["faiss"]["ivf recall@10"] == "0.875").all()
    q = built["query"].iloc[0]
    assert q["teacher s"] == "3,000*" and q["exact search ms"] == "30.00*" and q["approx search ms"] == "0.40"
    out = figures.plot_deploy(bench, tmp_path / "figures" / "deploy.png")
    assert out.stat().st_size > 10_000
    (tmp_path / "bench" / "deploy.json").unlink()
    assert tables.deploy_tables(tmp_path)["faiss"].index[0].startswith("missing: ")


def test_export_stage_refuses_a_task_without_a_dual_student_in_one_line(workspace, python):
    import subprocess

    done = subprocess.run([python, str(ROOT / "stages/export.py"), "--task", "pretrain"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --task pretrain: no dual-encoder student of runs is trained on it; nothing to export"]
