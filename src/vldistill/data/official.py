"""Readers of the official releases, from a root laid out exactly as each release unpacks.

| task | files under ``data.<task>.root`` |
|---|---|
| nlvr2 | ``{train,dev,test1}.json`` (JSON lines), ``images/train/<directory>/<id>-img{0,1}.png``, ``dev/``, ``test1/`` |
| snli_ve | ``snli_ve_{train,dev,test}.jsonl``, ``flickr30k_images/<Flickr30K_ID>.jpg`` |
| vqa | ``v2_OpenEnded_mscoco_{train2014,val2014}_questions.json``, ``v2_mscoco_{train2014,val2014}_annotations.json``, ``{train2014,val2014}/COCO_<split>_<12-digit id>.jpg`` (+ optional test-dev questions) |
| retrieval | ``dataset_flickr30k.json`` (Karpathy), ``flickr30k_images/<filename>`` |
| pretrain | ``dataset_coco.json`` (Karpathy), ``train2014/``, ``val2014/`` |

Every reader returns ``({split: DataFrame}, ImageLoader)``; images are decoded and resized once by the caller.
Errors name the file (and line) and what was wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from vldistill.data import vqa_answers

NLVR2_FILES = {"train": "train.json", "dev": "dev.json", "test": "test1.json"}
SNLI_FILES = {"train": "snli_ve_train.jsonl", "dev": "snli_ve_dev.jsonl", "test": "snli_ve_test.jsonl"}
SNLI_LABELS = ("entailment", "neutral", "contradiction")


class DataError(ValueError):
    """Bad input data; the message is one line naming the file (and line) and what was wrong."""


def json_lines(path: Path) -> list[dict]:
    """Parse a JSON-lines file; a malformed line raises :class:`DataError` with ``file:line``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg})") from None
    return rows


def json_file(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Decode an image and fit it into ``size = (H, W)``, aspect kept, padded with black: ``(H, W, 3)`` uint8.

    A missing or undecodable (e.g. truncated) file raises :class:`DataError` naming it.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from None
    height, width = size
    scale = min(height / im.height, width / im.width)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[: new[1], : new[0]] = np.asarray(im.resize(new, Image.BICUBIC), dtype=np.uint8)
    return canvas


class ImageStoreBuilder:
    """Collects images by path (each decoded once) and hands out integer keys into the store."""

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.keys: dict[Path, int] = {}
        self.images: list[np.ndarray] = []

    def key(self, path: Path) -> int:
        if path not in self.keys:
            self.images.append(load_image(path, self.size))
            self.keys[path] = len(self.images) - 1
        return self.keys[path]


def _check_label(value, allowed, path: Path, line: int):
    if value not in allowed:
        raise DataError(f"{path}:{line}: label {value!r} is not one of {list(allowed)}")


def read_nlvr2(root: Path, store: ImageStoreBuilder) -> dict[str, pd.DataFrame]:
    """NLVR2: one row per statement; images ``<split>-<set>-<pair>-img0/1.png`` (identifier without its last part)."""
    frames = {}
    for split, name in NLVR2_FILES.items():
        path = root / name
        rows = []
        for line, ex in enumerate(json_lines(path), 1):
            _check_label(ex.get("label"), ("True", "False"), path, line)
            stem = ex["identifier"].rsplit("-", 1)[0]
            folder = Path("images/train", str(ex["directory"])) if split == "train" else Path(name.removesuffix(".json"))
            if split != "train" and not (root / folder).is_dir() and (root / "images" / folder).is_dir():
                folder = Path("images") / folder
            rows.append({"identifier": ex["identifier"], "text": ex["sentence"], "label": int(ex["label"] == "True"),
                         "label_name": ex["label"], "image_left": store.key(root / folder / f"{stem}-img0.png"),
                         "image_right": store.key(root / folder / f"{stem}-img1.png")})
        frames[split] = pd.DataFrame(rows)
    return frames


def read_snli_ve(root: Path, store: ImageStoreBuilder) -> dict[str, pd.DataFrame]:
    """SNLI-VE: premise image ``flickr30k_images/<Flickr30K_ID>.jpg``, hypothesis ``sentence2``, ``gold_label``."""
    frames = {}
    for split, name in SNLI_FILES.items():
        path = root / name
        rows = []
        for line, ex in enumerate(json_lines(path), 1):
            _check_label(ex.get("gold_label"), SNLI_LABELS, path, line)
            rows.append({"identifier": ex.get("pairID", f"{split}-{line}"), "text": ex["sentence2"],
                         "label": SNLI_LABELS.index(ex["gold_label"]), "label_name": ex["gold_label"],
                         "image": store.key(root / "flickr30k_images" / f"{ex['Flickr30K_ID']}.jpg")})
        frames[split] = pd.DataFrame(rows)
    return frames


def _vqa_split(root: Path, coco_split: str, store: ImageStoreBuilder) -> pd.DataFrame:
    questions = json_file(root / f"v2_OpenEnded_mscoco_{coco_split}_questions.json")["questions"]
    annotation_path = root / f"v2_mscoco_{coco_split}_annotations.json"
    annotations = {a["question_id"]: a for a in json_file(annotation_path)["annotations"]}
    rows = []
    for q in questions:
        if q["question_id"] not in annotations:
            raise DataError(f"{annotation_path}: no annotation for question_id {q['question_id']}")
        scores = vqa_answers.answer_scores(a["answer"] for a in annotations[q["question_id"]]["answers"])
        image = root / coco_split / f"COCO_{coco_split}_{q['image_id']:012d}.jpg"
        rows.append({"question_id": q["question_id"], "text": q["question"], "answers": list(scores),
                     "scores": list(scores.values()), "image": store.key(image), "image_id": q["image_id"],
                     "coco_split": coco_split})
    return pd.DataFrame(rows)


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
    rows = [{"question_id": q["question_id"], "text": q["question"], "answers": [], "scores": [],
             "image": store.key(root / "test2015" / f"COCO_test2015_{q['image_id']:012d}.jpg"),
             "image_id": q["image_id"], "coco_split": "test2015"} for q in json_file(test_path)["questions"]]
    frames["test"] = pd.DataFrame(rows)
    return frames


def read_karpathy(root: Path, store: ImageStoreBuilder, dataset: str) -> dict[str, pd.DataFrame]:
    """Karpathy splits (``dataset_flickr30k.json`` / ``dataset_coco.json``): one row per caption; ``restval`` joins
    train, ``val`` is dev."""
    path = root / f"dataset_{dataset}.json"
    images = json_file(path)["images"]
    rows = {"train": [], "dev": [], "test": []}
    folder = {"flickr30k": lambda im: root / "flickr30k_images" / im["filename"],
              "coco": lambda im: root / im.get("filepath", "") / im["filename"]}[dataset]
    for number, image in enumerate(images):
        split = {"train": "train", "restval": "train", "val": "dev", "test": "test"}.get(image.get("split"))
        if split is None:
            raise DataError(f"{path}: image {number} has split {image.get('split')!r} (expected train/restval/val/test)")
        key = store.key(folder(image))
        for sentence in image["sentences"]:
            rows[split].append({"text": sentence["raw"], "image": key, "image_id": str(image.get("imgid", number))})
    return {split: pd.DataFrame(r) for split, r in rows.items()}


def read_visual_genome(root: Path, store: ImageStoreBuilder, max_regions_per_image: int) -> pd.DataFrame:
    """Visual Genome region descriptions (``region_descriptions.json``, images ``VG_100K/<id>.jpg`` or
    ``VG_100K_2/<id>.jpg``) as extra pre-training captions: up to ``max_regions_per_image`` phrases per image."""
    path = root / "region_descriptions.json"
    rows = []
    for entry in json_file(path):
        regions = entry.get("regions", [])[:max_regions_per_image]
        if not regions:
            continue
        image_id = regions[0]["image_id"]
        image = root / "VG_100K" / f"{image_id}.jpg"
        if not image.is_file() and (root / "VG_100K_2" / f"{image_id}.jpg").is_file():
            image = root / "VG_100K_2" / f"{image_id}.jpg"
        key = store.key(image)
        rows += [{"text": r["phrase"], "image": key, "image_id": f"vg-{image_id}"} for r in regions]
    return pd.DataFrame(rows)
