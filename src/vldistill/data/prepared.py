"""The prepared format every later stage reads, and ``prepare`` for the generated (``shapes``) sources.

``data/prepared/<task>/<split>.parquet`` holds one row per example (splits ``train``, ``dev``, ``test``), and
``data/prepared/<task>/images.npy`` is the image store: a ``(N, H, W, 3)`` uint8 array decoded and resized once, that
loads with ``np.load(mmap_mode='r')`` in milliseconds. Image columns (``image``, ``image_left``, ``image_right``)
hold integer keys into that array. The store is written in place, an image or a chunk at a time (generated images as
they are drawn, official ones by a pool of decoding processes), so ``prepare`` never holds it in memory.

Columns: pretrain and retrieval ``text, image, image_id``; nlvr2 ``text, label, label_name, image_left,
image_right, template``; snli_ve ``text, label, label_name, image, template``; vqa ``text, answers, scores, image,
image_id, question_id`` (and ``answers.json``, the answer vocabulary, beside the splits).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vldistill.config import Nlvr2Data, PretrainData, SceneParams
from vldistill.data import shapes
from vldistill.data.official import DataError, ImageStoreBuilder
from vldistill.io import write_json

SPLITS = ("train", "dev", "test")
NLVR2_LABELS = ("False", "True")
IMAGE_COLUMNS = ("image", "image_left", "image_right")
DECODE_CHUNK = 64  # images per task handed to a decoding process


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


def _npy_header(fh, shape: tuple[int, ...]) -> int:
    """Write the .npy (v1.0) header of a C-ordered uint8 array of ``shape`` at the file's position; returns its
    length. numpy pads it so that the first dimension can grow to 21 digits, hence the length does not depend on it."""
    start = fh.tell()
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                              "fortran_order": False, "shape": tuple(int(n) for n in shape)})
    return fh.tell() - start


class StoreWriter:
    """The image store ``images.npy`` written one image at a time: ``append`` streams an ``(H, W, 3)`` uint8 image
    to the file and returns its key, ``close`` writes the final count into the header. The file holds exactly the
    bytes of ``np.save(path, np.stack(images))``, while memory holds one image, not the store."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.shape: tuple[int, ...] | None = None
        self.count = 0
        self._fh = open(self.path, "wb")

    def __len__(self) -> int:
        return self.count

    def append(self, image: np.ndarray) -> int:
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"{self.path}: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        if self.shape is None:
            self.shape = image.shape
            self._header = _npy_header(self._fh, (0, *self.shape))
        elif image.shape != self.shape:
            raise ValueError(f"{self.path}: image {self.count} has shape {image.shape}, the store {self.shape}")
        self._fh.write(np.ascontiguousarray(image).data)
        self.count += 1
        return self.count - 1

    def close(self) -> None:
        if self.shape is None:
            raise ValueError(f"{self.path}: no images were written")
        self._fh.seek(0)
        if _npy_header(self._fh, (self.count, *self.shape)) != self._header:  # a numpy without header growth room
            raise RuntimeError(f"{self.path}: the .npy header changed length; cannot finish the store in place")
        self._fh.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self._fh.close()


def _compact(store_file: Path, good: np.ndarray) -> None:
    """Move the rows where ``good`` is true to the front of the store, in order, and cut the file after them."""
    store = np.load(store_file, mmap_mode="r+")
    shape, offset = store.shape, store.offset
    for new, old in enumerate(np.flatnonzero(good)):
        if new != old:
            store[new] = store[old]
    store.flush()
    del store
    kept = int(good.sum())
    with open(store_file, "r+b") as fh:
        if _npy_header(fh, (kept, *shape[1:])) != offset:
            raise RuntimeError(f"{store_file}: the .npy header changed length; cannot compact the store in place")
        fh.truncate(offset + kept * int(np.prod(shape[1:])))


def _decoded_chunks(builder: ImageStoreBuilder, store_file: Path, workers: int):
    """Decode the builder's images into ``store_file`` chunk by chunk (``workers`` processes; 0 or 1: this one) and
    yield ``(key, reason)`` for every unreadable one, in key order. Stopping early cancels the chunks not started."""
    from vldistill.data.official import decode_chunk

    paths = builder.paths
    starts = range(0, len(paths), DECODE_CHUNK)
    chunks = [paths[s:s + DECODE_CHUNK] for s in starts]
    progress = tqdm(total=len(paths), desc="decode images", leave=False, unit="img",
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    pool, workers = None, min(workers, len(chunks))  # a set of one chunk is decoded here, without a pool
    if workers <= 1:
        results = (decode_chunk(store_file, builder.size, s, c) for s, c in zip(starts, chunks, strict=True))
    else:  # spawn: the stage already runs threads (MLflow), which a forked child would inherit half-copied
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(decode_chunk, [store_file] * len(chunks), [builder.size] * len(chunks), starts, chunks)
    try:
        for chunk, bad in zip(chunks, results, strict=True):
            yield from bad
            progress.update(len(chunk))
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def decode_store(builder: ImageStoreBuilder, store_file: Path, workers: int, max_bad: int | None = None,
                 knob: str = "data") -> list[dict]:
    """Decode every image the builder collected into ``store_file``, a ``(N, H, W, 3)`` uint8 .npy created at its
    full size and filled in place by ``workers`` processes (memory holds a chunk per process, never the store); the
    bytes do not depend on ``workers``.

    ``max_bad=None``: the first unreadable image (in key order) raises :class:`DataError` naming it. Otherwise the
    unreadable images are left out (the store is compacted: keys stay dense, see :func:`dense_keys`) and returned
    as ``{"key", "path", "reason", "referenced_by"}``; one more than ``max_bad`` raises :class:`DataError` as soon
    as it is seen (``knob``, e.g. ``data.nlvr2``, names the settings in the message).
    """
    from vldistill.data.official import bad_image_message

    shape = (len(builder.paths), *builder.size, 3)
    store = np.lib.format.open_memmap(store_file, mode="w+", dtype=np.uint8, shape=shape)
    del store  # a sparse file of the final size: the chunks fill it in place
    bad = []
    with closing(_decoded_chunks(builder, store_file, workers)) as unreadable:
        for key, reason in unreadable:
            path, ref = builder.paths[key], builder.refs[key]
            if max_bad is None:
                raise DataError(bad_image_message(path, reason, ref))
            bad.append({"key": key, "path": str(path), "reason": reason, "referenced_by": ref})
            if len(bad) > max_bad:
                first = bad[0]
                raise DataError(f"{knob}.max_bad_fraction: {len(bad)} of {len(builder.paths)} images unreadable so "
                                f"far, more than the {max_bad} it lets {knob}.skip_bad_images drop; first: "
                                + bad_image_message(Path(first["path"]), first["reason"], first["referenced_by"]))
    if bad:
        _compact(store_file, dense_keys(len(builder.paths), [b["key"] for b in bad]) >= 0)
    return bad


def dense_keys(n: int, bad_keys: list[int]) -> np.ndarray:
    """Old key -> new key once the images ``bad_keys`` are left out of a store of ``n``; ``-1`` for those."""
    good = np.ones(n, dtype=bool)
    good[list(bad_keys)] = False
    return np.where(good, np.cumsum(good) - 1, -1)


def _drop_examples(frames: dict[str, pd.DataFrame], new_keys: np.ndarray) -> tuple[dict, dict[str, int]]:
    """Re-key the image columns with ``new_keys`` (see :func:`dense_keys`) and drop the rows that refer to a left-out
    image; returns the frames and how many rows each split lost."""
    out, dropped = {}, {}
    for split, frame in frames.items():
        columns = [c for c in IMAGE_COLUMNS if c in frame]
        keys = {c: new_keys[frame[c].to_numpy()] for c in columns}
        keep = np.logical_and.reduce([k >= 0 for k in keys.values()])
        frame = frame.assign(**keys)[keep].reset_index(drop=True)
        out[split], dropped[split] = frame, int((~keep).sum())
    return out, dropped


def _mkdir(path: str | Path) -> Path:
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _rng(seed: int, task: str, split: str) -> random.Random:
    """A generator per (seed, task, split): splits never share a random stream, and reruns are identical."""
    return random.Random(f"{seed}/{task}/{split}")


def _generate(task: str, sizes, seed: int, example, images: StoreWriter) -> dict[str, pd.DataFrame]:
    """Run ``example(rng, split, i, images) -> rows`` ``sizes.<split>`` times per split, each split with its own
    seeded stream; ``example`` appends the images it draws to the store ``images`` and refers to them by index."""
    frames = {}
    for split in SPLITS:
        rng = _rng(seed, task, split)
        rows = []
        for i in tqdm(range(getattr(sizes, split)), desc=f"{task}/{split}", leave=False,
                      mininterval=1.0 if sys.stderr.isatty() else 30.0):
            rows += example(rng, split, i, images)
        frames[split] = pd.DataFrame(rows)
    return frames


def _generate_pretrain(cfg: PretrainData, scene: SceneParams, seed: int,
                       images: StoreWriter) -> dict[str, pd.DataFrame]:
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

    return _generate("pretrain", cfg.images, seed, example, images)


def _generate_nlvr2(cfg: Nlvr2Data, scene: SceneParams, seed: int, images: StoreWriter) -> dict[str, pd.DataFrame]:
    def example(rng, split, i, images):
        statement, left, right, label = shapes.nlvr2_example(
            rng, list(cfg.templates), scene.grid, scene.min_objects, scene.max_objects)
        images.append(shapes.render(left, scene.grid, scene.cell, scene.jitter, rng))
        images.append(shapes.render(right, scene.grid, scene.cell, scene.jitter, rng))
        return [{"identifier": f"{split}-{i}", "text": statement.text, "label": int(label),
                 "label_name": NLVR2_LABELS[int(label)], "image_left": len(images) - 2, "image_right": len(images) - 1,
                 "template": statement.template}]

    return _generate("nlvr2", cfg.pairs, seed, example, images)


def _generate_snli_ve(cfg, scene: SceneParams, seed: int, images: StoreWriter) -> dict[str, pd.DataFrame]:
    def example(rng, split, i, images):
        hypothesis, objs, covered, label = shapes.snli_ve_example(
            rng, list(cfg.templates), scene.grid, scene.min_objects, scene.max_objects, cfg.max_occluders)
        images.append(shapes.render_occluded(objs, covered, scene.grid, scene.cell, scene.jitter, rng))
        return [{"identifier": f"{split}-{i}", "text": hypothesis.text, "label": shapes.SNLI_LABELS.index(label),
                 "label_name": label, "image": len(images) - 1, "template": hypothesis.template,
                 "occluded": len(covered)}]

    return _generate("snli_ve", cfg.pairs, seed, example, images)


def _generate_retrieval(cfg, scene: SceneParams, seed: int, images: StoreWriter) -> dict[str, pd.DataFrame]:
    def example(rng, split, i, images):
        objs = shapes.random_scene(rng, scene.grid, scene.min_objects, scene.max_objects)
        images.append(shapes.render(objs, scene.grid, scene.cell, scene.jitter, rng))
        key = len(images) - 1
        return [{"text": text, "image": key, "image_id": f"{split}-{key}"}
                for text in shapes.distinct_captions(objs, scene.grid, cfg.captions_per_image, rng)]

    return _generate("retrieval", cfg.images, seed, example, images)


def _read_easy_vqa(cfg, scene: SceneParams, seed: int, images: StoreWriter) -> dict:
    """easy-VQA (PyPI ``easy-vqa``): train questions of all but the last ``holdout_images`` training images → train,
    those → dev; the package's test split → test. One answer per question, score 1.0."""
    import easy_vqa
    from PIL import Image

    from vldistill.data import vqa_answers

    sources = {"train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
               "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())}
    keys = {}

    def image_key(split: str, image_id: int, path: str) -> int:
        if (split, image_id) not in keys:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((cfg.easy_vqa_size, cfg.easy_vqa_size), Image.BICUBIC)
                keys[split, image_id] = images.append(np.asarray(im, dtype=np.uint8))
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
    return {split: pd.DataFrame(r) for split, r in rows.items()}


def _vqa_vocabulary(frames: dict[str, pd.DataFrame], min_freq: int) -> tuple[list[str], dict[str, pd.DataFrame]]:
    """The answer vocabulary from train; training questions with no in-vocabulary answer are dropped (train only)."""
    from vldistill.data import vqa_answers

    vocab = vqa_answers.vocabulary(frames["train"]["answers"], min_freq)
    known = set(vocab)
    train = frames["train"]
    keep = train["answers"].map(lambda answers: any(a in known for a in answers))
    return vocab, {**frames, "train": train[keep].reset_index(drop=True)}


def _read_official(task: str, cfg, store_file: Path) -> tuple[dict[str, pd.DataFrame], dict]:
    """An official release (downloaded first when ``root`` is missing and ``url`` is set): the readers collect the
    image paths, then :func:`decode_store` writes the store. With ``skip_bad_images`` the examples that refer to an
    unreadable image are dropped; returns the frames and what was skipped (empty when the knob is off)."""
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
    if not store.paths:
        raise DataError(f"data.{task} ({root}): no images were read")
    workers = len(os.sched_getaffinity(0)) if cfg.decode_workers is None else cfg.decode_workers
    max_bad = int(cfg.max_bad_fraction * len(store.paths)) if cfg.skip_bad_images else None
    bad = decode_store(store, store_file, workers, max_bad, knob=f"data.{task}")
    if not cfg.skip_bad_images:
        return frames, {}
    frames, dropped = _drop_examples(frames, dense_keys(len(store.paths), [b["key"] for b in bad]))
    return frames, {"skipped_images": [{k: b[k] for k in ("path", "reason", "referenced_by")} for b in bad],
                    "dropped_examples": dropped}


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
    final = Path(out_root) / task
    staging = Path(tempfile.mkdtemp(prefix=f".{task}.", dir=_mkdir(out_root)))
    try:  # write everything into a staging directory, then swap it in: never a half-written task directory
        store_file = staging / "images.npy"
        if generate is _read_official:
            frames, skipped = _read_official(task, data_cfg, store_file)
        else:
            with StoreWriter(store_file) as images:
                frames, skipped = generate(data_cfg, scene, seed, images), {}
        for split in SPLITS:
            if split not in frames or frames[split].empty:
                where = f" ({data_cfg.root})" if data_cfg.source == "official" else ""
                raise DataError(f"data.{task}{where}: split {split!r} is empty")
        extra = {}
        if task == "vqa":
            vocab, frames = _vqa_vocabulary(frames, data_cfg.min_answer_freq)
            write_json(staging / "answers.json", vocab)
            extra["answer_vocabulary"] = len(vocab)
        shape = np.load(store_file, mmap_mode="r").shape
        store_stats = {"images": shape[0], "shape": list(shape[1:])}
        for split, frame in frames.items():
            frame.to_parquet(staging / f"{split}.parquet", index=False)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stats = {"task": task, "source": data_cfg.source, "splits": summary(task, frames), "image_store": store_stats,
             **extra, **skipped}
    write_json(metrics_path, stats)
    return {**stats, "seconds": round(time.perf_counter() - start, 2)}
