"""The prepared format every later stage reads, and ``prepare`` for the generated (``shapes``) sources.

``data/prepared/<task>/<split>.parquet`` holds one row per example (splits ``train``, ``dev``, ``test``), and
``data/prepared/<task>/images.npy`` is the image store: a ``(N, H, W, 3)`` uint8 array decoded and resized once, that
loads with ``np.load(mmap_mode='r')`` in milliseconds. Image columns (``image``, ``image_left``, ``image_right``)
hold integer keys into that array.

Columns: pretrain and retrieval ``text, image, image_id``; nlvr2 ``text, label, label_name, image_left,
image_right, template``; snli_ve ``text, label, label_name, image, template``; vqa ``text, answers, scores, image,
image_id, question_id`` (and ``answers.json``, the answer vocabulary, beside the splits).
"""

from __future__ import annotations

import json

import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vldistill.config import Nlvr2Data, PretrainData, SceneParams
from vldistill.data import shapes
from vldistill.data.official import DataError
from vldistill.io import write_json

SPLITS = ("train", "dev", "test")
NLVR2_LABELS = ("False", "True")


def split_path(root: str | Path, task: str, split: str) -> Path:
    return Path(root) / task / f"{split}.parquet"


def store_path(root: str | Path, task: str) -> Path:
    return Path(root) / task / "images.npy"


def read_split(root: str | Path, task: str, split: str) -> pd.DataFrame:
    """One prepared split; a clear error when it is missing or empty."""
    path = split_path(root, task, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared split not found (run `dvc repro prepare@{task}`)")
    frame = pd.read_parquet(path)
    if frame.empty:
        raise ValueError(f"{path}: prepared split is empty")
    return frame


def read_answers(root: str | Path, task: str = "vqa") -> list[str]:
    """The VQA answer vocabulary (``answers.json``): index ``a`` of a score vector is ``answers[a]``."""
    path = Path(root) / task / "answers.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: answer vocabulary not found (run `dvc repro prepare@{task}`)")
    return json.loads(path.read_text())


def read_images(root: str | Path, task: str) -> np.ndarray:
    """The task's image store ``(N, H, W, 3)`` uint8, memory-mapped."""
    path = store_path(root, task)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image store not found (run `dvc repro prepare@{task}`)")
    return np.load(path, mmap_mode="r")


def _mkdir(path: str | Path) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _rng(seed: int, task: str, split: str) -> random.Random:
    """A generator per (seed, task, split): splits never share a random stream, and reruns are identical."""
    return random.Random(f"{seed}/{task}/{split}")


def _generate(task: str, sizes, seed: int, example) -> tuple[dict, list[np.ndarray]]:
    """Run ``example(rng, split, i, images) -> rows`` ``sizes.<split>`` times per split, each split with its own
    seeded stream; ``example`` appends the images it draws to ``images`` and refers to them by index."""
    frames, images = {}, []
    for split in SPLITS:
        rng = _rng(seed, task, split)
        rows = []
        for i in tqdm(range(getattr(sizes, split)), desc=f"{task}/{split}", leave=False,
                      mininterval=1.0 if sys.stderr.isatty() else 30.0):
            rows += example(rng, split, i, images)
        frames[split] = pd.DataFrame(rows)
    return frames, images


def _generate_pretrain(cfg: PretrainData, scene: SceneParams, seed: int) -> tuple[dict, list[np.ndarray]]:
    def example(rng, split, i, images):
        objs = shapes.random_scene(rng, scene.grid, scene.min_objects, scene.max_objects)
        images.append(shapes.render(objs, scene.grid, scene.cell, scene.jitter, rng))
        captions = []
        for _ in range(cfg.captions_per_image * 4):  # draw until enough distinct captions (or give up)
            text = shapes.caption(objs, scene.grid, rng)
            if text not in captions:
                captions.append(text)
            if len(captions) == cfg.captions_per_image:
                break
        key = len(images) - 1
        return [{"text": t, "image": key, "image_id": f"{split}-{key}"} for t in captions]

    return _generate("pretrain", cfg.images, seed, example)


def _generate_nlvr2(cfg: Nlvr2Data, scene: SceneParams, seed: int) -> tuple[dict, list[np.ndarray]]:
    def example(rng, split, i, images):
        statement, left, right, label = shapes.nlvr2_example(
            rng, list(cfg.templates), scene.grid, scene.min_objects, scene.max_objects)
        images.append(shapes.render(left, scene.grid, scene.cell, scene.jitter, rng))
        images.append(shapes.render(right, scene.grid, scene.cell, scene.jitter, rng))
        return [{"identifier": f"{split}-{i}", "text": statement.text, "label": int(label),
                 "label_name": NLVR2_LABELS[int(label)], "image_left": len(images) - 2, "image_right": len(images) - 1,
                 "template": statement.template}]

    return _generate("nlvr2", cfg.pairs, seed, example)


def _generate_snli_ve(cfg, scene: SceneParams, seed: int) -> tuple[dict, list[np.ndarray]]:
    def example(rng, split, i, images):
        hypothesis, objs, covered, label = shapes.snli_ve_example(
            rng, list(cfg.templates), scene.grid, scene.min_objects, scene.max_objects, cfg.max_occluders)
        images.append(shapes.render_occluded(objs, covered, scene.grid, scene.cell, scene.jitter, rng))
        return [{"identifier": f"{split}-{i}", "text": hypothesis.text, "label": shapes.SNLI_LABELS.index(label),
                 "label_name": label, "image": len(images) - 1, "template": hypothesis.template,
                 "occluded": len(covered)}]

    return _generate("snli_ve", cfg.pairs, seed, example)


def _generate_retrieval(cfg, scene: SceneParams, seed: int) -> tuple[dict, list[np.ndarray]]:
    def example(rng, split, i, images):
        objs = shapes.random_scene(rng, scene.grid, scene.min_objects, scene.max_objects)
        images.append(shapes.render(objs, scene.grid, scene.cell, scene.jitter, rng))
        key = len(images) - 1
        return [{"text": text, "image": key, "image_id": f"{split}-{key}"}
                for text in shapes.distinct_captions(objs, scene.grid, cfg.captions_per_image, rng)]

    return _generate("retrieval", cfg.images, seed, example)


def _read_easy_vqa(cfg, scene: SceneParams, seed: int) -> tuple[dict, list[np.ndarray]]:
    """easy-VQA (PyPI ``easy-vqa``): train questions of all but the last ``holdout_images`` training images → train,
    those → dev; the package's test split → test. One answer per question, score 1.0."""
    import easy_vqa
    from PIL import Image

    from vldistill.data import vqa_answers

    sources = {"train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
               "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}
    images, keys = [], {}

    def image_key(split: str, image_id: int, path: str) -> int:
        if (split, image_id) not in keys:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((cfg.easy_vqa_size, cfg.easy_vqa_size), Image.BICUBIC)
                images.append(np.asarray(im, dtype=np.uint8))
            keys[split, image_id] = len(images) - 1
        return keys[split, image_id]

    rows = {"train": [], "dev": [], "test": []}
    train_ids = sorted(set(sources["train"][0][2]))
    if cfg.holdout_images >= len(train_ids):
        raise ValueError(f"data.vqa.holdout_images={cfg.holdout_images}: must be < the {len(train_ids)} training images")
    held_out = set(train_ids[-cfg.holdout_images:])
    for source_split, ((questions, answers, image_ids), paths) in sources.items():
        for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids, strict=True)):
            split = "dev" if source_split == "train" and image_id in held_out else source_split
            rows[split].append({"question_id": f"{source_split}-{i}", "text": question,
                                "answers": [vqa_answers.normalize_answer(answer)], "scores": [1.0],
                                "image": image_key(source_split, image_id, paths[image_id]),
                                "image_id": f"{source_split}-{image_id}"})
    if cfg.max_questions is not None:  # a seeded subset, kept in the original order
        for split, limit in cfg.max_questions.model_dump().items():
            if len(rows[split]) > limit:
                kept = sorted(random.Random(seed).sample(range(len(rows[split])), limit))
                rows[split] = [rows[split][i] for i in kept]
    return {split: pd.DataFrame(r) for split, r in rows.items()}, images


def _vqa_vocabulary(frames: dict[str, pd.DataFrame], min_freq: int) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """The answer vocabulary from train; training questions with no in-vocabulary answer are dropped (train only)."""
    from vldistill.data import vqa_answers

    vocab = vqa_answers.vocabulary(frames["train"]["answers"], min_freq)
    known = set(vocab)
    train = frames["train"]
    keep = train["answers"].map(lambda answers: any(a in known for a in answers))
    return vocab, {**frames, "train": train[keep].reset_index(drop=True)}


def _read_official(task: str, cfg) -> tuple[dict, list[np.ndarray]]:
    """An official release (downloaded first when ``root`` is missing and ``url`` is set)."""
    from vldistill.data import official
    from vldistill.data.download import ensure_root

    root = ensure_root(cfg.root, cfg.url, cfg.sha256)
    store = official.ImageStoreBuilder((cfg.image_size[0], cfg.image_size[1]))
    readers = {"nlvr2": lambda: official.read_nlvr2(root, store), "snli_ve": lambda: official.read_snli_ve(root, store),
               "vqa": lambda: official.read_vqa(root, store, cfg.holdout_images),
               "retrieval": lambda: official.read_karpathy(root, store, "flickr30k"),
               "pretrain": lambda: official.read_karpathy(root, store, "coco")}
    frames = readers[task]()
    if task == "pretrain" and cfg.vg_root:
        vg = official.read_visual_genome(Path(cfg.vg_root), store, cfg.vg_regions_per_image)
        frames["train"] = pd.concat([frames["train"], vg], ignore_index=True)
    if not store.images:
        raise DataError(f"data.{task} ({root}): no images were read")
    return frames, store.images


def summary(task: str, frames: dict[str, pd.DataFrame]) -> dict:
    """Counts per split and the label distribution: what ``metrics/data/<task>.json`` holds."""
    out = {}
    for split, frame in frames.items():
        entry = {"examples": int(len(frame))}
        if "label_name" in frame:
            entry["labels"] = {k: int(v) for k, v in sorted(Counter(frame["label_name"]).items())}
        if "template" in frame:
            entry["templates"] = {k: int(v) for k, v in sorted(Counter(frame["template"]).items())}
        if "image" in frame:
            entry["images"] = int(frame["image"].nunique())
        if "answers" in frame:
            top = Counter(a for answers in frame["answers"] for a in answers).most_common(20)
            entry["top_answers"] = {a: int(c) for a, c in top}
        out[split] = entry
    return out


def prepare(task: str, data_cfg, scene: SceneParams, seed: int, out_root: str | Path, metrics_path: str | Path) -> dict:
    """Generate or read one task into the prepared format. Everything is written into a staging directory that
    replaces ``<out_root>/<task>`` only once complete, so bad input or an interruption never leaves a
    finished-looking partial output. Returns the summary
    (plus the wall time in ``seconds``, which is kept out of the metrics file so reruns write identical bytes)."""
    start = time.perf_counter()
    generate = {("pretrain", "official"): _read_official, ("nlvr2", "official"): _read_official,
                ("snli_ve", "official"): _read_official, ("vqa", "official"): _read_official,
                ("retrieval", "official"): _read_official,
                ("pretrain", "shapes"): _generate_pretrain, ("nlvr2", "shapes"): _generate_nlvr2,
                ("snli_ve", "shapes"): _generate_snli_ve, ("retrieval", "shapes"): _generate_retrieval,
                ("vqa", "easy_vqa"): _read_easy_vqa}.get((task, data_cfg.source))
    if generate is None:
        raise ValueError(f"data.{task}.source={data_cfg.source!r}: not available for {task} in this version")
    frames, images = generate(task, data_cfg) if generate is _read_official else generate(data_cfg, scene, seed)
    for split in SPLITS:
        if split not in frames or frames[split].empty:
            where = f" ({data_cfg.root})" if data_cfg.source == "official" else ""
            raise DataError(f"data.{task}{where}: split {split!r} is empty")
    extra = {}
    final = Path(out_root) / task
    staging = Path(tempfile.mkdtemp(prefix=f".{task}.", dir=_mkdir(out_root)))
    try:  # write everything into a staging directory, then swap it in: never a half-written task directory
        if task == "vqa":
            vocab, frames = _vqa_vocabulary(frames, data_cfg.min_answer_freq)
            write_json(staging / "answers.json", vocab)
            extra["answer_vocabulary"] = len(vocab)
        np.save(staging / "images.npy", np.stack(images))
        for split, frame in frames.items():
            frame.to_parquet(staging / f"{split}.parquet", index=False)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stats = {"task": task, "source": data_cfg.source, "splits": summary(task, frames),
             "image_store": {"images": len(images), "shape": list(images[0].shape)}, **extra}
    write_json(metrics_path, stats)
    return {**stats, "seconds": round(time.perf_counter() - start, 2)}
