"""A cached image-embedding index: every gallery image encoded once by the image tower, searched with FAISS.

Layout of an index directory::

    images.csv          row → name (the table a search result is read from)
    image_embeds.npy    (N, D) float32 unit-norm retrieval embeddings (what FAISS holds)
    image_cls.npy       (N, D) float32 image-tower [CLS] vectors (what the fusion head takes; NLVR2 models also
    image2_cls.npy       keep the second-image encoding, token type 2)
    index.faiss         the FAISS index over image_embeds (inner product = cosine)
    index.json          the model's fingerprint and directory, task, count, dim, FAISS kind

Building is resumable: the arrays are ``.npy`` memory maps filled batch by batch, and ``progress.json`` records
how many rows are on disk (written after the rows are flushed), so an interrupted build continues at the first
missing batch and ends with the same bytes as an uninterrupted one. ``index.json`` appears last.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from vldistill.deploy.images import ImageSource
from vldistill.io import read_json, write_json

KINDS = ("flat", "hnsw", "ivf")
"""``flat``: exact inner product; ``hnsw``: graph (M = 32); ``ivf``: inverted lists (√N cells, 16 probed)."""
TRAIN_PER_LIST = 50
"""IVF: k-means trains on about this many rows per cell (FAISS asks for at least 39)."""


def names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def faiss_index(embeds: np.ndarray, kind: str, ivf_lists: int | None = None, ivf_probe: int = 16,
                hnsw_m: int = 32, hnsw_ef_search: int = 64):
    """A FAISS inner-product index of kind ``flat`` | ``hnsw`` | ``ivf`` holding ``embeds (N, D)`` float32."""
    import faiss

    n, dim = embeds.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = hnsw_ef_search
    elif kind == "ivf":
        lists = max(1, min(ivf_lists or round(np.sqrt(n)), n // TRAIN_PER_LIST))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        step = max(1, n // (TRAIN_PER_LIST * lists))  # k-means on an evenly strided sample: seconds, not minutes
        index.train(np.ascontiguousarray(embeds[::step]))
        index.nprobe = min(ivf_probe, lists)
    else:
        raise ValueError(f"--faiss {kind!r}: one of {', '.join(KINDS)}")
    index.add(embeds)
    return index


def _arrays(task: str) -> list[str]:
    return ["image_embeds", "image_cls"] + (["image2_cls"] if task == "nlvr2" else [])


def build_index(runner, source: ImageSource, out: str | Path, *, model_dir: str | Path, info: dict,
                batch_size: int = 64, kind: str = "flat", progress: bool = True) -> dict:
    """Encode every image of ``source`` with ``runner`` (:class:`~vldistill.deploy.onnx_towers.TorchRunner` or
    ``OnnxRunner``) into ``out``; continues an interrupted build of the same model, images and batch size, and only
    rebuilds the FAISS index when a finished one of another ``kind`` is there. Returns ``index.json``. ``info`` is
    the export's ``vldistill.json`` (fingerprint, task)."""
    import faiss

    if kind not in KINDS:
        raise ValueError(f"--faiss {kind!r}: one of {', '.join(KINDS)}")
    out = Path(out)
    want = {"fingerprint": info["fingerprint"], "names": names_digest(source.names), "batch_size": batch_size,
            "count": len(source)}
    done = _resume_point(out, want)
    if done is None:  # already complete for this model and these images: at most another FAISS index to build
        meta = read_json(out / "index.json")
        if meta["faiss"] != kind:
            embeds = np.load(out / "image_embeds.npy")
            faiss.write_index(faiss_index(embeds, kind), str(out / "index.faiss"))
            meta["faiss"] = kind
            write_json(out / "index.json", meta)
        return meta
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"row": range(len(source)), "name": source.names}).to_csv(out / "images.csv", index=False)
    arrays = {}
    for name in _arrays(info["task"]):
        path = out / f"{name}.npy"
        if done:
            arrays[name] = np.load(path, mmap_mode="r+")
        else:
            arrays[name] = None  # created with the first batch, once the width is known
    with tqdm(total=len(source), initial=done, unit="img", desc="index",
              disable=None if progress else True) as bar:  # None: a bar on a terminal only
        for start in range(done, len(source), batch_size):
            stop = min(start + batch_size, len(source))
            pixels = source.pixels(start, stop).numpy()
            cls, embeds = runner.image(pixels, 1)
            rows = {"image_embeds": embeds, "image_cls": cls}
            if "image2_cls" in arrays:
                rows["image2_cls"] = runner.image(pixels, 2)[0]
            for name, values in rows.items():
                if arrays[name] is None:
                    arrays[name] = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=np.float32,
                                                             shape=(len(source), values.shape[1]))
                arrays[name][start:stop] = values
                arrays[name].flush()
            write_json(out / "progress.json", {**want, "done": stop})
            bar.update(stop - start)
    embeds = np.ascontiguousarray(arrays["image_embeds"])
    faiss.write_index(faiss_index(embeds, kind), str(out / "index.faiss"))
    meta = {"model": str(Path(model_dir).resolve()), "fingerprint": info["fingerprint"], "task": info["task"],
            "count": len(source), "dim": int(embeds.shape[1]), "faiss": kind, "names": want["names"],
            "batch_size": batch_size}
    write_json(out / "index.json", meta)
    (out / "progress.json").unlink()
    return meta


def _resume_point(out: Path, want: dict) -> int | None:
    """Rows already encoded in ``out`` for this build (0: start afresh), or None when ``out`` is a complete index
    of it. A directory holding another model's or other images' index is refused."""
    for name in ("index.json", "progress.json"):
        path = out / name
        if not path.is_file():
            continue
        found = read_json(path)
        if found["fingerprint"] != want["fingerprint"]:
            raise ValueError(f"--out {out}: holds an index of another model ({found['fingerprint'][:19]}...); "
                             "choose another --out or delete it")
        if found["names"] != want["names"]:
            raise ValueError(f"--out {out}: holds an index of other images; choose another --out or delete it")
        if name == "index.json":
            return None
        return found["done"] if found["batch_size"] == want["batch_size"] else 0
    return 0


class UnknownImage(KeyError):
    """An image name the index does not hold."""


class ImageIndex:
    """An index directory opened for queries: ``names``, ``meta`` (``index.json``), FAISS search, cached vectors."""

    def __init__(self, directory: str | Path):
        import faiss

        directory = Path(directory)
        if not (directory / "index.json").is_file():
            hint = " (an interrupted build: rerun `vldistill index`)" if (directory / "progress.json").is_file() else ""
            raise FileNotFoundError(f"--index {directory}: not a finished vldistill index{hint}")
        self.directory, self.meta = directory, read_json(directory / "index.json")
        self.names = pd.read_csv(directory / "images.csv", dtype={"name": str})["name"].tolist()
        self.rows = {name: row for row, name in enumerate(self.names)}
        self.faiss = faiss.read_index(str(directory / "index.faiss"))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries (Q, D)`` unit-norm → ``(scores (Q, k), rows (Q, k))``, best first (cosine similarity)."""
        return self.faiss.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.names)))

    def row(self, name: str) -> int:
        if name not in self.rows:
            shown = ", ".join(self.names[:3])
            raise UnknownImage(f"--image {name!r}: not in the index ({len(self.names)} images, e.g. {shown})")
        return self.rows[name]

    def cls(self, name: str, second: bool = False) -> np.ndarray:
        """The cached image-tower [CLS] ``(1, D)`` of image ``name`` (``second``: as NLVR2's second image)."""
        array = np.load(self.directory / ("image2_cls.npy" if second else "image_cls.npy"), mmap_mode="r")
        row = self.row(name)
        return np.array(array[row:row + 1])
