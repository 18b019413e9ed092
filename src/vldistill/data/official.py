"""Readers of the official releases, from a root laid out exactly as each release unpacks.

| task | files under ``data.<task>.root`` |
|---|---|
| nlvr2 | ``{train,dev,test1}.json`` (JSON lines), ``images/train/<directory>/<id>-img{0,1}.png``, ``dev/``, ``test1/`` |
| snli_ve | ``snli_ve_{train,dev,test}.jsonl``, ``flickr30k_images/<Flickr30K_ID>.jpg`` |
| vqa | ``v2_OpenEnded_mscoco_{train2014,val2014}_questions.json``, ``v2_mscoco_{train2014,val2014}_annotations.json``, ``{train2014,val2014}/COCO_<split>_<12-digit id>.jpg`` (+ optional test-dev questions) |
| retrieval | ``dataset_flickr30k.json`` (Karpathy), ``flickr30k_images/<filename>`` |
| pretrain | ``dataset_coco.json`` (Karpathy), ``train2014/``, ``val2014/`` |

Every reader returns ``{split: DataFrame}`` and registers the image paths it refers to with an
:class:`ImageStoreBuilder`, which then decodes and resizes each once, in a pool of processes, straight into the
image store on disk.
Errors name the file (and line) and what was wrong.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from vldistill.data import vqa_answers

NLVR2_FILES = {"train": "train.json", "dev": "dev.json", "test": "test1.json"}
SNLI_FILES = {"train": "snli_ve_train.jsonl", "dev": "snli_ve_dev.jsonl", "test": "snli_ve_test.jsonl"}
SNLI_LABELS = ("entailment", "neutral", "contradiction")
NLVR2_KEYS = ("identifier", "sentence", "label", "directory (train)")
SNLI_KEYS = ("Flickr30K_ID", "sentence2", "gold_label")


class DataError(ValueError):
    """Bad input data; the message is one line naming the file (and line) and what was wrong."""


def json_records(path: Path) -> list[tuple[int, dict]]:
    """Parse a JSON-lines file into ``(line number, object)`` pairs (blank lines skipped); a malformed line, or one
    that is not a JSON object, raises :class:`DataError` with ``file:line``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((number, row))
    return rows


@contextmanager
def record(where: str, expected):
    """Turn a missing key or a value of the wrong type while reading one record (``where`` = ``file:line`` or
    ``file: image N``) into a one-line :class:`DataError`; ``expected`` lists the keys the record must have."""
    try:
        yield
    except DataError:
        raise
    except KeyError as err:
        raise DataError(f"{where}: missing key {err.args[0]!r} (expected keys: {', '.join(expected)})") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{where}: unexpected value ({err}); expected keys: {', '.join(expected)}") from None


def json_file(path: Path, key: str | None = None, kind: type = list):
    """Parse a JSON file; with ``key``, return ``data[key]``, which must be a ``kind`` (one-line errors otherwise)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    if key is None:
        return data
    if not isinstance(data, dict) or not isinstance(data.get(key), kind):
        raise DataError(f"{path}: expected a JSON object with a {kind.__name__} under {key!r}")
    return data[key]


def _decode(path: Path, size: tuple[int, int]) -> np.ndarray | str:
    """``path`` fitted into ``size = (H, W)``, aspect kept, padded with black: ``(H, W, 3)`` uint8; or, for a
    missing or undecodable (e.g. truncated) file, the reason as one line (so a worker process can report it)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "image not found"
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"cannot decode image ({err}); expected a complete image file"
    height, width = size
    scale = min(height / im.height, width / im.width)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[: new[1], : new[0]] = np.asarray(im.resize(new, Image.BICUBIC), dtype=np.uint8)
    return canvas


def bad_image_message(path: Path, reason: str, ref: str | None) -> str:
    """The one-line error for an unreadable image: the file, why, and the record that refers to it."""
    return f"{path}: {reason}" + (f" (referenced by {ref})" if ref else "")


def load_image(path: Path, size: tuple[int, int], ref: str | None = None) -> np.ndarray:
    """Decode an image and fit it into ``size = (H, W)``, aspect kept, padded with black: ``(H, W, 3)`` uint8.

    A missing or undecodable (e.g. truncated) file raises :class:`DataError` naming it (and ``ref``, the record that
    refers to it).
    """
    image = _decode(path, size)
    if isinstance(image, str):
        raise DataError(bad_image_message(path, image, ref))
    return image


def decode_chunk(store_file: Path, size: tuple[int, int], start: int, paths: list[Path]) -> list[tuple[int, str]]:
    """Decode ``paths`` into rows ``start, start + 1, ...`` of the memory-mapped store (in a worker process or in
    this one); returns ``(row, reason)`` for each image that could not be read (its row stays black)."""
    store = np.load(store_file, mmap_mode="r+")
    bad = []
    for row, path in enumerate(paths, start):
        image = _decode(path, size)
        if isinstance(image, str):
            bad.append((row, image))
        else:
            store[row] = image
    del store  # unmapped; the pages are the file's, in the page cache, written back by the kernel
    return bad


class ImageStoreBuilder:
    """Collects images by path and hands out integer keys into the store (one per path, in order of first use);
    :func:`vldistill.data.prepared.decode_store` then decodes them all into the store file."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.keys: dict[Path, int] = {}
        self.paths: list[Path] = []
        self.refs: list[str | None] = []

    def key(self, path: Path, ref: str | None = None) -> int:
        """The store index of ``path``; ``ref`` names the (first) record that refers to it."""
        if path not in self.keys:
            self.keys[path] = len(self.paths)
            self.paths.append(path)
            self.refs.append(ref)
        return self.keys[path]


def _check_label(value, allowed, path: Path, line: int):
    if value not in allowed:
        raise DataError(f"{path}:{line}: label {value!r} is not one of {list(allowed)}")


def _not_empty(rows: list, path: Path, split: str) -> list:
    if not rows:
        raise DataError(f"{path}: no examples (the {split} split would be empty)")
    return rows


def read_nlvr2(root: Path, store: ImageStoreBuilder) -> dict[str, pd.DataFrame]:
    """NLVR2: one row per statement; images ``<split>-<set>-<pair>-img0/1.png`` (identifier without its last part)."""
    frames = {}
    for split, name in NLVR2_FILES.items():
        path = root / name
        rows = []
        for line, ex in json_records(path):
            _check_label(ex.get("label"), ("True", "False"), path, line)
            where = f"{path}:{line}"
            with record(where, NLVR2_KEYS):
                stem = ex["identifier"].rsplit("-", 1)[0]
                folder = (Path("images/train", str(ex["directory"])) if split == "train"
                          else Path(name.removesuffix(".json")))
                if split != "train" and not (root / folder).is_dir() and (root / "images" / folder).is_dir():
                    folder = Path("images") / folder
                rows.append({"identifier": ex["identifier"], "text": _text(ex["sentence"]),
                             "label": int(ex["label"] == "True"), "label_name": ex["label"],
                             "image_left": store.key(root / folder / f"{stem}-img0.png", where),
                             "image_right": store.key(root / folder / f"{stem}-img1.png", where)})
        frames[split] = pd.DataFrame(_not_empty(rows, path, split))
    return frames


def read_snli_ve(root: Path, store: ImageStoreBuilder) -> dict[str, pd.DataFrame]:
    """SNLI-VE: premise image ``flickr30k_images/<Flickr30K_ID>.jpg``, hypothesis ``sentence2``, ``gold_label``."""
    frames = {}
    for split, name in SNLI_FILES.items():
        path = root / name
        rows = []
        for index, (line, ex) in enumerate(json_records(path), 1):
            _check_label(ex.get("gold_label"), SNLI_LABELS, path, line)
            where = f"{path}:{line}"
            with record(where, SNLI_KEYS):
                rows.append({"identifier": ex.get("pairID", f"{split}-{index}"), "text": _text(ex["sentence2"]),
                             "label": SNLI_LABELS.index(ex["gold_label"]), "label_name": ex["gold_label"],
                             "image": store.key(root / "flickr30k_images" / f"{ex['Flickr30K_ID']}.jpg", where)})
        frames[split] = pd.DataFrame(_not_empty(rows, path, split))
    return frames


QUESTION_KEYS = ("question_id", "image_id (int)", "question")
ANNOTATION_KEYS = ("question_id", "answers: [{answer}]")


def _vqa_split(root: Path, coco_split: str, store: ImageStoreBuilder) -> pd.DataFrame:
    question_path = root / f"v2_OpenEnded_mscoco_{coco_split}_questions.json"
    questions = json_file(question_path, "questions")
    annotation_path = root / f"v2_mscoco_{coco_split}_annotations.json"
    annotations = {}
    for number, a in enumerate(json_file(annotation_path, "annotations")):
        with record(f"{annotation_path}: annotation {number}", ANNOTATION_KEYS):
            annotations[a["question_id"]] = a
    rows = []
    for number, q in enumerate(questions):
        where = f"{question_path}: question {number}"
        with record(where, QUESTION_KEYS):
            if q["question_id"] not in annotations:
                raise DataError(f"{annotation_path}: no annotation for question_id {q['question_id']}")
            with record(f"{annotation_path}: annotation of question_id {q['question_id']}", ANNOTATION_KEYS):
                scores = vqa_answers.answer_scores(a["answer"] for a in annotations[q["question_id"]]["answers"])
            image = root / coco_split / f"COCO_{coco_split}_{q['image_id']:012d}.jpg"
            rows.append({"question_id": q["question_id"], "text": _text(q["question"]), "answers": list(scores),
                         "scores": list(scores.values()), "image": store.key(image, where), "image_id": q["image_id"],
                         "coco_split": coco_split})
    return pd.DataFrame(_not_empty(rows, question_path, coco_split))


def read_vqa(root: Path, store: ImageStoreBuilder, holdout_images: int) -> dict[str, pd.DataFrame]:
    """VQAv2 as ViLT splits it: train = train2014 + val2014 except the last ``holdout_images`` val2014 images, which
    form dev; test = the test-dev questions (no answers) when ``v2_OpenEnded_mscoco_test-dev2015_questions.json`` is
    there."""
    train, val = _vqa_split(root, "train2014", store), _vqa_split(root, "val2014", store)
    val_images = sorted(val["image_id"].unique())
    if holdout_images >= len(val_images):
        raise DataError(f"{root}: data.vqa.holdout_images={holdout_images} must be < the {len(val_images)} val2014 images")
    held = set(val_images[-holdout_images:])
    frames = {"train": pd.concat([train, val[~val["image_id"].isin(held)]], ignore_index=True),
              "dev": val[val["image_id"].isin(held)].reset_index(drop=True)}
    test_path = root / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    if not test_path.is_file():
        raise DataError(f"{test_path}: file not found (VQAv2 test-dev questions; their answers are scored by the "
                        "official server)")
    rows = []
    for number, q in enumerate(json_file(test_path, "questions")):
        where = f"{test_path}: question {number}"
        with record(where, QUESTION_KEYS):
            rows.append({"question_id": q["question_id"], "text": _text(q["question"]), "answers": [], "scores": [],
                         "image": store.key(root / "test2015" / f"COCO_test2015_{q['image_id']:012d}.jpg", where),
                         "image_id": q["image_id"], "coco_split": "test2015"})
    frames["test"] = pd.DataFrame(_not_empty(rows, test_path, "test"))
    return frames


def read_karpathy(root: Path, store: ImageStoreBuilder, dataset: str) -> dict[str, pd.DataFrame]:
    """Karpathy splits (``dataset_flickr30k.json`` / ``dataset_coco.json``): one row per caption; ``restval`` joins
    train, ``val`` is dev."""
    path = root / f"dataset_{dataset}.json"
    images = json_file(path, "images")
    rows = {"train": [], "dev": [], "test": []}
    folder = {"flickr30k": lambda im: root / "flickr30k_images" / im["filename"],
              "coco": lambda im: root / im.get("filepath", "") / im["filename"]}[dataset]
    expected = ("filename", "split", "sentences: [{raw}]") + (("filepath",) if dataset == "coco" else ())
    for number, image in enumerate(images):
        where = f"{path}: image {number}"
        with record(where, expected):
            split = {"train": "train", "restval": "train", "val": "dev", "test": "test"}.get(image.get("split"))
            if split is None:
                raise DataError(f"{where} has split {image.get('split')!r} (expected train/restval/val/test)")
            key = store.key(folder(image), where)
            for sentence in image["sentences"]:
                rows[split].append({"text": _text(sentence["raw"]), "image": key,
                                    "image_id": str(image.get("imgid", number))})
    for split, karpathy in (("train", "train/restval"), ("dev", "val"), ("test", "test")):
        if not rows[split]:
            raise DataError(f"{path}: no captions with split {karpathy} (the {split} split would be empty)")
    return {split: pd.DataFrame(r) for split, r in rows.items()}


def read_visual_genome(root: Path, store: ImageStoreBuilder, max_regions_per_image: int) -> pd.DataFrame:
    """Visual Genome region descriptions (``region_descriptions.json``, images ``VG_100K/<id>.jpg`` or
    ``VG_100K_2/<id>.jpg``) as extra pre-training captions: up to ``max_regions_per_image`` phrases per image."""
    path = root / "region_descriptions.json"
    rows = []
    entries = json_file(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of {{id, regions}} entries")
    for number, entry in enumerate(entries):
        where = f"{path}: entry {number}"
        with record(where, ("regions: [{image_id, phrase}]",)):
            regions = entry.get("regions", [])[:max_regions_per_image]
            if not regions:
                continue
            image_id = regions[0]["image_id"]
            image = root / "VG_100K" / f"{image_id}.jpg"
            if not image.is_file() and (root / "VG_100K_2" / f"{image_id}.jpg").is_file():
                image = root / "VG_100K_2" / f"{image_id}.jpg"
            key = store.key(image, where)
            rows += [{"text": _text(r["phrase"]), "image": key, "image_id": f"vg-{image_id}"} for r in regions]
    return pd.DataFrame(rows)


def _text(value) -> str:
    """A sentence / question / caption field: must be a string (a number or null would end up in the parquet)."""
    if not isinstance(value, str):
        raise TypeError(f"text {value!r} is not a string")
    return value
