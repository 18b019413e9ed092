"""Torch-side view of a prepared split: texts tokenised once, images gathered from the store per batch.

A split is held as whole tensors (token ids ``(N, T)``, the uint8 image store ``(M, H, W, 3)``), and a batch is a
gather of rows, so data loading costs microseconds per example and never limits training speed. The DataLoader
iterates over example indices; Fabric can wrap it with a distributed sampler unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vldistill.data.prepared import read_images, read_split


def to_pixels(images: torch.Tensor, norm: str) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` → float ``(B, 3, H, W)``: ``unit`` = x/255 (black = 0), ``vilt`` = (x/255 − 0.5)/0.5."""
    pixels = images.permute(0, 3, 1, 2).float().div_(255.0)
    return pixels.sub_(0.5).div_(0.5) if norm == "vilt" else pixels


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask, both ``(N, max_len)``, padded to the fixed length (same T for teacher and student)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class Indices(Dataset):
    """The dataset a DataLoader sees: just ``0..n-1``; :meth:`EncodedSplit.collate` turns indices into a batch."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@dataclass
class EncodedSplit:
    """One prepared split in memory. ``columns`` maps batch keys to per-example tensors ``(N, ...)``; image-key
    columns (``image``, ``image_left``, ``image_right``) are turned into pixels ``(B, 3, H, W)`` at collate time."""

    columns: dict[str, torch.Tensor]
    images: torch.Tensor
    pixel_norm: str
    texts: list[str]

    IMAGE_KEYS = {"image": "pixel_values", "image_left": "pixel_values_left", "image_right": "pixel_values_right"}

    def __len__(self) -> int:
        return len(self.texts)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"index": idx}
        for key, values in self.columns.items():
            batch[key] = values[idx]
            if key in self.IMAGE_KEYS:
                batch[self.IMAGE_KEYS[key]] = to_pixels(self.images[values[idx]], self.pixel_norm)
        return batch

    def loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(Indices(len(self)), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          collate_fn=self.collate, generator=generator, num_workers=0)

    def random_pixels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Pixels of ``n`` images drawn uniformly from the store (ITM negatives)."""
        keys = torch.randint(len(self.images), (n,), generator=generator)
        return to_pixels(self.images[keys], self.pixel_norm)


def load_split(root: str | Path, task: str, split: str, tokenizer, max_len: int, pixel_norm: str) -> EncodedSplit:
    """Read a prepared split and its image store, tokenise every text once."""
    frame = read_split(root, task, split)
    images = torch.from_numpy(np.array(read_images(root, task)))  # a writable in-memory copy
    texts = frame["text"].tolist()
    input_ids, attention_mask = tokenize(tokenizer, texts, max_len)
    columns = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in ("image", "image_left", "image_right", "label"):
        if key in frame:
            columns[key if key != "label" else "labels"] = torch.as_tensor(frame[key].to_numpy(), dtype=torch.long)
    return EncodedSplit(columns=columns, images=images, pixel_norm=pixel_norm, texts=texts)
