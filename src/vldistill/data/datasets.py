"""Torch-side view of a prepared split: texts tokenised once, images gathered from the store per batch.

A split is held as whole tensors (token ids ``(N, T)``, the uint8 image store ``(M, H, W, 3)``), and a batch is a
gather of rows, so data loading costs microseconds per example and never limits training speed. The DataLoader
iterates over batches of example indices from :class:`EpochBatches`, which also shards them over processes (one
optimizer step of W processes sees the examples one process would) and skips ahead to resume mid-epoch.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vldistill.data.prepared import read_answers, read_images, read_split


Augment = Callable[..., torch.Tensor]  # augment(uint8 images (B, H, W, 3), generator=...) → same shape and dtype


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


class EpochBatches(Sampler[list[int]]):
    """Batches of example indices, one epoch at a time: the order is a function of ``(seed, epoch)`` only.

    Order: with ``shuffle``, ``torch.randperm(n)`` from a generator seeded ``seed + epoch`` after one int64 draw (the
    draw torch's DataLoader makes from its generator for the worker base seed before a ``RandomSampler`` shuffles, so
    the order is that of ``DataLoader(shuffle=True, generator=g)`` with ``g`` reseeded per epoch, which every earlier
    run used); else ``0..n-1``. Batches are consecutive runs of ``batch_size`` of that order.

    Sharding (:meth:`shard`): the order is cut into global batches of ``batch_size * accumulate * world`` examples;
    rank ``r`` takes the contiguous slice ``[r * batch_size * accumulate, (r + 1) * batch_size * accumulate)`` of
    each, as ``accumulate`` batches of ``batch_size``. One optimizer step of ``world`` processes thus sees exactly the
    examples one process sees with ``accumulate * world`` accumulation steps. ``world=1, accumulate=1`` is no sharding.

    Skip-ahead (:meth:`set_epoch`): the first ``skip`` batches of the epoch are not yielded (resume mid-epoch).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.rank, self.world, self.accumulate = 0, 1, 1
        self.epoch, self.skip = 0, 0

    def shard(self, rank: int, world: int, accumulate: int = 1) -> None:
        """Yield only rank ``rank``'s share of each global batch of ``batch_size * accumulate * world`` examples."""
        if not 0 <= rank < world or accumulate < 1:
            raise ValueError(f"shard(rank={rank}, world={world}, accumulate={accumulate}): need 0 <= rank < world, "
                             "accumulate >= 1")
        if world > 1 and not self.drop_last:
            raise ValueError("sharding over processes needs drop_last=True (every rank must take the same steps)")
        self.rank, self.world, self.accumulate = rank, world, accumulate

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate epoch ``epoch``'s order next, leaving out its first ``skip`` batches (of this rank)."""
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        """The epoch's order of all ``n`` example indices (the same on every rank)."""
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base-seed draw, see above
        return torch.randperm(self.n, generator=generator).tolist()

    def batches(self) -> list[list[int]]:
        """This rank's batches of the epoch, before skipping: ``len(self) + skip`` lists of ``batch_size`` indices
        (the last one shorter when ``drop_last`` is false and ``n`` is not a multiple)."""
        order, chunk = self.order(), self.batch_size * self.accumulate
        group = chunk * self.world
        stop = self.n - self.n % group if self.drop_last else self.n
        out = []
        for start in range(0, stop, group):
            mine = order[start + self.rank * chunk:min(start + (self.rank + 1) * chunk, stop)]
            out += [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        return out

    def __iter__(self):
        return iter(self.batches()[self.skip:])

    def __len__(self) -> int:
        group = self.batch_size * self.accumulate * self.world
        if self.drop_last:
            full = self.n // group * self.accumulate
        else:  # world == 1 (see shard): every chunk of batch_size, the last one possibly short
            full = math.ceil(self.n / self.batch_size)
        return max(0, full - self.skip)


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

    def collate(self, indices: list[int], augment: Augment | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The batch of examples ``indices``; image columns become pixels ``(B, 3, H, W)``.

        ``augment(images, generator)`` (uint8 ``(B, H, W, 3)`` → same) transforms the gathered images first, with a
        generator seeded from ``seed`` and the indices themselves: a batch is augmented the same way whenever it is
        collated (a resumed run replays it exactly, on any number of processes) and draws nothing from other streams.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"index": idx}
        generator = None
        if augment is not None:
            # torch's CPU generator keeps 32 bits of a seed: one CRC-32 over the seed and the indices
            generator = torch.Generator().manual_seed(zlib.crc32(np.array([seed, *indices], dtype=np.int64)))
        for key, values in self.columns.items():
            batch[key] = values[idx]
            if key in self.IMAGE_KEYS:
                images = self.images[values[idx]]
                if augment is not None:
                    images = augment(images, generator=generator)
                batch[self.IMAGE_KEYS[key]] = to_pixels(images, self.pixel_norm)
        return batch

    def loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
               augment: Augment | None = None) -> DataLoader:
        """Batches from :class:`EpochBatches` (``loader.batch_sampler``: ``set_epoch`` picks the epoch's order,
        ``shard`` the process's share), their images through ``augment`` if given (see :meth:`collate`). The
        DataLoader gets a generator of its own so that iterating it never draws from the global torch RNG (the
        stream dropout and masking use)."""
        batches = EpochBatches(len(self), batch_size, shuffle, seed, drop_last)
        collate = self.collate if augment is None else partial(self.collate, augment=augment, seed=seed)
        return DataLoader(Indices(len(self)), batch_sampler=batches, collate_fn=collate,
                          generator=torch.Generator().manual_seed(seed), num_workers=0)

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
            columns[key if key != "label" else "labels"] = torch.as_tensor(frame[key].to_numpy().copy(), dtype=torch.long)
    if "answers" in frame:  # VQA: soft-score targets over the answer vocabulary
        columns["targets"] = vqa_targets(frame, read_answers(root, task))
    return EncodedSplit(columns=columns, images=images, pixel_norm=pixel_norm, texts=texts)


def vqa_targets(frame, answers: list[str]) -> torch.Tensor:
    """``(N, A)`` float: each question's soft score per answer of the vocabulary (0 for answers it never got)."""
    index = {a: i for i, a in enumerate(answers)}
    targets = torch.zeros(len(frame), len(answers))
    for row, (names, scores) in enumerate(zip(frame["answers"], frame["scores"])):
        for name, score in zip(names, scores):
            if name in index:
                targets[row, index[name]] = float(score)
    return targets
