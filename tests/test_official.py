"""Official formats: small fixtures written here in the exact layouts of NLVR2, SNLI-VE, VQAv2, Flickr30K and COCO
(Karpathy) go through the same `prepare`; bad data stops it with one line naming the file; downloads resume and
are checksum-verified (against a local HTTP server on 127.0.0.1, never the network)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vldistill.config import Nlvr2Data, PretrainData, RetrievalData, SceneParams, SnliVeData, VqaData
from vldistill.data.download import fetch
from vldistill.data.official import DataError
from vldistill.data.prepared import prepare, read_images, read_split

SIZE = [32, 48]


def _png(path: Path, colour=(200, 30, 30), size=(40, 30), fmt="PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path, fmt)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def nlvr2_fixture(root: Path) -> Path:
    _jsonl(root / "train.json", [
        {"identifier": "train-10-0-0", "sentence": "There are two dogs.", "label": "True", "directory": 7},
        {"identifier": "train-10-0-1", "sentence": "There is one dog.", "label": "False", "directory": 7}])
    for side in (0, 1):
        _png(root / "images/train/7" / f"train-10-0-img{side}.png")
    for split, folder in (("dev", "dev"), ("test1", "test1")):
        _jsonl(root / f"{split}.json", [{"identifier": f"{split}-3-1-0", "sentence": "A bird.", "label": "True"}])
        for side in (0, 1):
            _png(root / folder / f"{split}-3-1-img{side}.png", colour=(0, 0, 250))
    return root


def snli_fixture(root: Path) -> Path:
    for split, labels in (("train", ["entailment", "neutral", "contradiction"]), ("dev", ["neutral"]),
                          ("test", ["contradiction"])):
        _jsonl(root / f"snli_ve_{split}.jsonl", [{"Flickr30K_ID": "1000", "sentence2": f"{split} {i}",
                                                  "gold_label": label, "pairID": f"{split}{i}"}
                                                 for i, label in enumerate(labels)])
    _png(root / "flickr30k_images/1000.jpg", fmt="JPEG")
    return root


def vqa_fixture(root: Path) -> Path:
    def questions(split, ids):
        return {"questions": [{"image_id": i, "question": f"what is {i}?", "question_id": i * 10} for i in ids]}

    def annotations(ids):
        answers = ["Two", "2", "two.", "2", "three", "3", "yes", "no", "red", "Two"]
        return {"annotations": [{"question_id": i * 10, "image_id": i,
                                 "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]}
                                for i in ids]}

    splits = {"train2014": [1, 2], "val2014": [3, 4, 5]}
    for split, ids in splits.items():
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(questions(split, ids)))
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(annotations(ids)))
        for i in ids:
            _png(root / split / f"COCO_{split}_{i:012d}.jpg", fmt="JPEG")
    (root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(questions("test", [9])))
    _png(root / "test2015/COCO_test2015_000000000009.jpg", fmt="JPEG")
    return root


def karpathy_fixture(root: Path, dataset: str) -> Path:
    images = []
    for n, split in enumerate(["train", "restval", "val", "test"]):
        folder = "flickr30k_images" if dataset == "flickr30k" else ("train2014" if split == "train" else "val2014")
        name = f"{n}.jpg"
        _png(root / folder / name, fmt="JPEG")
        entry = {"filename": name, "split": split, "imgid": n,
                 "sentences": [{"raw": f"caption {n}.{k}"} for k in range(5)]}
        if dataset == "coco":
            entry["filepath"] = folder
        images.append(entry)
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": images, "dataset": dataset}))
    return root


def _prepare(task, cfg, tmp_path):
    out = tmp_path / "prepared"
    return prepare(task, cfg, SceneParams(), 0, out, tmp_path / f"{task}.json"), out


def test_nlvr2_official(tmp_path):
    cfg = Nlvr2Data(source="official", root=str(nlvr2_fixture(tmp_path / "nlvr2")), image_size=SIZE)
    stats, out = _prepare("nlvr2", cfg, tmp_path)
    train = read_split(out, "nlvr2", "train")
    assert list(train["label"]) == [1, 0] and list(train["label_name"]) == ["True", "False"]
    assert train["image_left"][0] == train["image_left"][1]  # same pair of images, decoded once
    images = read_images(out, "nlvr2")
    assert images.shape[1:] == (32, 48, 3)
    assert stats["splits"]["test"]["examples"] == 1


def test_snli_ve_official(tmp_path):
    cfg = SnliVeData(source="official", root=str(snli_fixture(tmp_path / "snli")), image_size=SIZE)
    stats, out = _prepare("snli_ve", cfg, tmp_path)
    train = read_split(out, "snli_ve", "train")
    assert list(train["label"]) == [0, 1, 2] and stats["splits"]["train"]["labels"]["neutral"] == 1


def test_vqa_official_splits_and_soft_scores(tmp_path):
    cfg = VqaData(source="official", root=str(vqa_fixture(tmp_path / "vqa")), image_size=SIZE, holdout_images=1)
    stats, out = _prepare("vqa", cfg, tmp_path)
    train, dev, test = (read_split(out, "vqa", s) for s in ("train", "dev", "test"))
    assert sorted(train["image_id"]) == [1, 2, 3, 4] and list(dev["image_id"]) == [5] and len(test) == 1
    row = dict(zip(train["answers"][0], train["scores"][0], strict=True))
    # "Two","2","two.","2","Two" → "2" ×5 → 1.0; "three","3" → "3" ×2 → 0.6; yes/no/red ×1 → 0.3
    assert row == {"2": 1.0, "3": pytest.approx(0.6), "yes": pytest.approx(0.3), "no": pytest.approx(0.3),
                   "red": pytest.approx(0.3)}
    vocab = json.loads((out / "vqa/answers.json").read_text())
    assert vocab[0] == "2" and set(vocab) == {"2", "3", "yes", "no", "red"}


@pytest.mark.parametrize("task, dataset, cls", [("retrieval", "flickr30k", RetrievalData),
                                                 ("pretrain", "coco", PretrainData)])
def test_karpathy_official(tmp_path, task, dataset, cls):
    cfg = cls(source="official", root=str(karpathy_fixture(tmp_path / dataset, dataset)), image_size=SIZE)
    stats, out = _prepare(task, cfg, tmp_path)
    assert {s: v["examples"] for s, v in stats["splits"].items()} == {"train": 10, "dev": 5, "test": 5}
    assert read_split(out, task, "train")["image"].nunique() == 2  # train + restval


# ------------------------------------------------------------------------------------------------- bad data
def _expect_one_line(task, cfg, tmp_path, *fragments):
    with pytest.raises(DataError) as info:
        _prepare(task, cfg, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "prepared" / task / "train.parquet").exists()  # nothing finished-looking left behind


def test_missing_image(tmp_path):
    root = nlvr2_fixture(tmp_path / "nlvr2")
    (root / "images/train/7/train-10-0-img1.png").unlink()
    cfg = Nlvr2Data(source="official", root=str(root), image_size=SIZE)
    _expect_one_line("nlvr2", cfg, tmp_path, "train-10-0-img1.png", "not found")


def test_truncated_image(tmp_path):
    root = snli_fixture(tmp_path / "snli")
    path = root / "flickr30k_images/1000.jpg"
    path.write_bytes(path.read_bytes()[:40])
    _expect_one_line("snli_ve", SnliVeData(source="official", root=str(root), image_size=SIZE), tmp_path,
                     "1000.jpg", "cannot decode")


def test_malformed_json_line(tmp_path):
    root = snli_fixture(tmp_path / "snli")
    with open(root / "snli_ve_train.jsonl", "a") as fh:
        fh.write('{"Flickr30K_ID": "1000", "sentence2": \n')
    _expect_one_line("snli_ve", SnliVeData(source="official", root=str(root), image_size=SIZE), tmp_path,
                     "snli_ve_train.jsonl:4", "malformed JSON")


def test_unknown_label(tmp_path):
    root = nlvr2_fixture(tmp_path / "nlvr2")
    _jsonl(root / "dev.json", [{"identifier": "dev-3-1-0", "sentence": "A bird.", "label": "Maybe"}])
    _expect_one_line("nlvr2", Nlvr2Data(source="official", root=str(root), image_size=SIZE), tmp_path,
                     "dev.json:1", "'Maybe'")


def test_empty_split(tmp_path):
    root = snli_fixture(tmp_path / "snli")
    (root / "snli_ve_dev.jsonl").write_text("")
    _expect_one_line("snli_ve", SnliVeData(source="official", root=str(root), image_size=SIZE), tmp_path,
                     "snli_ve_dev.jsonl", "no examples", "dev split")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (what a resumable download needs); silent."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_resumes_and_verifies_checksum(server, tmp_path):
    served, url = server
    payload = bytes(range(256)) * 1000
    (served / "archive.bin").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "dl" / "archive.bin"
    dest.parent.mkdir()
    (dest.parent / "archive.bin.part").write_bytes(payload[:1000])  # an interrupted earlier attempt
    fetch(f"{url}/archive.bin", dest, digest)
    assert dest.read_bytes() == payload and not (dest.parent / "archive.bin.part").exists()
    bad = tmp_path / "dl" / "other.bin"
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch(f"{url}/archive.bin", bad, "0" * 64)
    assert not bad.exists() and not (tmp_path / "dl" / "other.bin.part").exists()


def test_prepare_downloads_a_missing_root(server, tmp_path):
    import zipfile

    served, url = server
    fixture = snli_fixture(tmp_path / "fixture")
    with zipfile.ZipFile(served / "snli.zip", "w") as zf:
        for f in fixture.rglob("*"):
            if f.is_file():
                zf.write(f, f.relative_to(fixture))
    digest = hashlib.sha256((served / "snli.zip").read_bytes()).hexdigest()
    cfg = SnliVeData(source="official", root=str(tmp_path / "snli_root"), url=f"{url}/snli.zip", sha256=digest,
                     image_size=SIZE)
    stats, _ = _prepare("snli_ve", cfg, tmp_path)
    assert stats["splits"]["train"]["examples"] == 3 and (tmp_path / "snli_root/snli_ve_train.jsonl").is_file()


def test_coco_plus_visual_genome_regions(tmp_path):
    vg = tmp_path / "vg"
    (vg / "VG_100K").mkdir(parents=True)
    _png(vg / "VG_100K/42.jpg", fmt="JPEG")
    (vg / "region_descriptions.json").write_text(json.dumps([
        {"id": 42, "regions": [{"phrase": f"region {k}", "image_id": 42, "x": 0, "y": 0, "width": 5, "height": 5}
                               for k in range(8)]}]))
    cfg = PretrainData(source="official", root=str(karpathy_fixture(tmp_path / "coco", "coco")), image_size=SIZE,
                       vg_root=str(vg), vg_regions_per_image=3)
    stats, out = _prepare("pretrain", cfg, tmp_path)
    train = read_split(out, "pretrain", "train")
    assert stats["splits"]["train"]["examples"] == 13 and (train["image_id"] == "vg-42").sum() == 3


def test_prepare_stage_reads_official_fixture_and_reports_bad_data(tmp_path):
    """The stage entry point itself: `source: official` via -S overrides; bad data exits 2 with one line."""
    import subprocess
    import sys

    from conftest import ROOT

    root = nlvr2_fixture(tmp_path / "nlvr2")
    args = [sys.executable, str(ROOT / "stages/prepare.py"), "--params", str(ROOT / "params.yaml"), "--task", "nlvr2",
            "-S", "data.nlvr2.source=official", "-S", f"data.nlvr2.root={root}", "-S", "data.nlvr2.image_size=[32, 48]"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "data/prepared/nlvr2/train.parquet").is_file()
    assert (tmp_path / "reports/data/nlvr2_examples.png").is_file()
    (root / "dev/dev-3-1-img0.png").write_bytes(b"\x89PNG\r\n")  # truncated
    bad = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "dev-3-1-img0.png" in errors[0] and "cannot decode" in errors[0]
    assert (tmp_path / "data/prepared/nlvr2/train.parquet").is_file()  # the previous good output is kept
