"""Where a gallery's images come from: a folder of image files, or a prepared task's image store.

Either way a source is a list of ``names`` (the folder's files by relative path, sorted; a prepared store's keys as
decimal strings) and :meth:`pixels`, a batch of them as the model's input ``(B, 3, H, W)``: decoded, converted to
RGB, fitted into the size the model was trained at as ``prepare`` fits images, and normalised as in training
(:func:`vldistill.data.datasets.to_pixels`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vldistill.data.datasets import to_pixels
from vldistill.data.official import load_image
from vldistill.data.prepared import read_images, read_split, store_path

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_COLUMNS = ("image", "image_left", "image_right")


class ImageSource:
    """``names`` and the uint8 ``(H, W, 3)`` image of each, fitted to ``image_size = [H, W]``."""

    def __init__(self, names: list[str], load, image_size: list[int], pixel_norm: str):
        if not names:
            raise ValueError("--images: no images found")
        self.names, self._load, self.image_size, self.pixel_norm = names, load, list(image_size), pixel_norm

    def __len__(self) -> int:
        return len(self.names)

    def pixels(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start..stop-1`` as model input ``(B, 3, H, W)``."""
        return to_pixels(torch.from_numpy(np.stack([self._load(i) for i in range(start, stop)])), self.pixel_norm)


def folder(path: str | Path, image_size: list[int], pixel_norm: str) -> ImageSource:
    """Every image file under ``path`` (recursively, by :data:`EXTENSIONS`), named by its path relative to it, fitted
    as ``prepare`` fits official images (:func:`vldistill.data.official.load_image`: aspect kept, padded)."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)

    def load(i: int) -> np.ndarray:
        return load_image(files[i], tuple(image_size))

    if not files:
        raise ValueError(f"--images {path}: no image files ({', '.join(EXTENSIONS)}) in it")
    return ImageSource([p.relative_to(root).as_posix() for p in files], load, image_size, pixel_norm)


def prepared(task_dir: str | Path, image_size: list[int], pixel_norm: str, split: str | None = None) -> ImageSource:
    """A prepared task's store (``data/prepared/<task>``): all of it, or the images ``split`` refers to in order of
    first appearance (the order evaluation ranks them in); names are store keys."""
    task_dir = Path(task_dir)
    store = read_images(task_dir.parent, task_dir.name)
    if list(store.shape[1:3]) != list(image_size):
        raise ValueError(f"--images {task_dir}: images are {list(store.shape[1:3])}, the model takes {image_size}")
    if split is None:
        keys = list(range(len(store)))
    else:
        frame = read_split(task_dir.parent, task_dir.name, split)
        columns = [frame[c].to_numpy() for c in IMAGE_COLUMNS if c in frame]
        keys = list(dict.fromkeys(int(k) for row in zip(*columns) for k in row))
    return ImageSource([str(k) for k in keys], lambda i: np.asarray(store[keys[i]]), image_size, pixel_norm)


def open_source(path: str | Path, image_size: list[int], pixel_norm: str, split: str | None = None) -> ImageSource:
    """:func:`prepared` when ``path`` holds an ``images.npy`` store, else :func:`folder`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--images {path}: no such directory")
    if store_path(path.parent, path.name).is_file():
        return prepared(path, image_size, pixel_norm, split)
    if split is not None:
        raise ValueError(f"--split {split}: only for a prepared task directory (with images.npy), not {path}")
    return folder(path, image_size, pixel_norm)
