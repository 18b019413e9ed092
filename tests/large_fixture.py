"""Official-format data sets of any size, for tests that need many real image files (bounded memory, bad images).

``nlvr2(root, pairs)`` writes NLVR2 exactly as the release unpacks (``train.json``, ``dev.json``, ``test1.json``,
``images/train/<directory>/``, ``dev/``, ``test1/``; see :mod:`vldistill.data.official`): ``pairs[split]`` statements,
each with its own two PNG images of seeded noise, ``source_size = (W, H)`` pixels, so that no two images are alike and
a store of ``store_bytes(pairs, image_size)`` bytes comes out of ``prepare`` with ``image_size = [H, W]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

FOLDERS = {"train": "images/train", "dev": "dev", "test": "test1"}
FILES = {"train": "train.json", "dev": "dev.json", "test": "test1.json"}


def image_paths(root: Path, split: str, index: int, directory: int) -> tuple[Path, Path]:
    """The two image files of statement ``index`` of ``split`` (``directory``: the train sub-folder)."""
    folder = root / FOLDERS[split] / (str(directory) if split == "train" else "")
    stem = f"{split}-{index}-0"
    return folder / f"{stem}-img0.png", folder / f"{stem}-img1.png"


def nlvr2(root: Path, pairs: dict[str, int], source_size: tuple[int, int] = (64, 48), seed: int = 0,
          directories: int = 10) -> Path:
    """Write an NLVR2-format set under ``root``: ``pairs = {"train": n, "dev": n, "test": n}`` statements, labels
    alternating True/False, each statement with two distinct noise images; returns ``root``."""
    rng = np.random.default_rng(seed)
    width, height = source_size
    for split, count in pairs.items():
        rows = []
        for i in range(count):
            directory = i % directories
            row = {"identifier": f"{split}-{i}-0-0", "sentence": f"statement {i} of {split}.",
                   "label": "True" if i % 2 == 0 else "False"}
            if split == "train":
                row["directory"] = directory
            rows.append(row)
            for path in image_paths(root, split, i, directory):
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, compress_level=1)
        (root / FILES[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def store_bytes(pairs: dict[str, int], image_size: tuple[int, int]) -> int:
    """Bytes of the image store ``prepare`` writes for ``nlvr2(root, pairs)`` at ``image_size = [H, W]`` (data only)."""
    return 2 * sum(pairs.values()) * image_size[0] * image_size[1] * 3


def truncate(path: Path, keep: int = 40) -> Path:
    """Cut an image file after ``keep`` bytes (an interrupted download): it still exists, but cannot be decoded."""
    path.write_bytes(path.read_bytes()[:keep])
    return path
