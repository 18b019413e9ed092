"""Torch-side view of a prepared split: texts tokenised once, images gathered from the memory-mapped store per batch.

A split holds its per-example columns as tensors (token ids ``(N, T)``, labels, image keys; VQA's soft scores as a
sparse :class:`SparseTargets`) and the task's image store ``(M, H, W, 3)`` uint8 as an :class:`ImageStore` over
``images.npy``: nothing of the store is copied, a batch copies only its own images out of the page cache, which every
process mapping the file shares (DDP ranks, DataLoader workers). So memory stays bounded whatever the data size.

One batch: :class:`EpochBatches` (main process) picks the example indices, which also shards them over processes
(one optimizer step of W processes sees the examples one process would) and skips ahead to resume mid-epoch;
:class:`Gather` (in a DataLoader worker when ``data.loader.num_workers`` > 0) copies the rows and the uint8 images
and RandAugments them with a generator seeded from the indices; :func:`to_device` moves the batch to the device
(from pinned memory on CUDA) and turns the images into float pixels there. The batch depends on the indices and the
seed only, never on the number of workers.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vldistill.config import LoaderParams
from vldistill.data.prepared import read_answers, read_images, read_split
from vldistill.memory import return_large_blocks


Augment = Callable[..., torch.Tensor]  # augment(uint8 images (B, H, W, 3), generator=...) → same shape and dtype

IMAGE_KEYS = {"image": "pixel_values", "image_left": "pixel_values_left", "image_right": "pixel_values_right"}
"""Image-key column (store keys ``(N,)``) → the batch key of its pixels."""


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


class ImageStore:
    """A task's image store ``(M, H, W, 3)`` uint8, read per batch from the memory-mapped ``images.npy``.

    ``store[keys]`` (keys: a LongTensor, a list or an int) copies only those images, as a uint8 tensor
    ``(K, H, W, 3)`` (or ``(H, W, 3)``); the file's pages live in the page cache, shared by every process that maps it.
    The map is not pickled (pickling a ``np.memmap`` would copy the whole array): a store sent to another process
    (DataLoader workers under spawn) carries its path and maps the file again on first use there; forked workers
    inherit the parent's map. ``len``, ``shape``, ``dtype`` and ``nbytes`` are the array's.
    """

    def __init__(self, array: np.memmap):
        if not isinstance(array, np.memmap) or array.filename is None:
            raise TypeError("ImageStore needs the memmap of a file (np.load(path, mmap_mode='r'))")
        self.path = Path(array.filename)
        self.shape, self.dtype = tuple(array.shape), array.dtype
        self._array: np.memmap | None = array

    @classmethod
    def open(cls, path: str | Path) -> ImageStore:
        return cls(np.load(path, mmap_mode="r"))

    def array(self) -> np.memmap:
        """The read-only memmap (mapped on first use in this process)."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __getitem__(self, keys) -> torch.Tensor:
        if isinstance(keys, torch.Tensor):
            keys = keys.numpy()
        rows = self.array()[keys]  # fancy indexing copies the rows; an int or a slice is a view of the file
        if not rows.flags.writeable:
            rows = np.array(rows)
        return torch.from_numpy(rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


@dataclass
class SparseTargets:
    """VQA's soft scores: the ``(N, A)`` float32 matrix of each question's score per answer, stored by row (CSR).

    Question ``i``'s answers are ``answers[offsets[i]:offsets[i + 1]]`` (distinct), with ``scores`` alike; the
    rest of its row is 0. ``targets[rows]`` is the dense ``(B, A)`` block of those rows (a batch's ``targets``);
    ``gather(1, index)`` and ``any()`` act as on the dense matrix (metrics over a whole split) without building it.
    At paper size (VQAv2 train: 440k questions x 3,129 answers) the dense matrix would be 5.5 GB per process.
    """

    offsets: torch.Tensor  # (N + 1,) long
    answers: torch.Tensor  # (nnz,) long
    scores: torch.Tensor   # (nnz,) float32
    num_answers: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.num_answers

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _entries(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row position in rows, entry position)`` of every stored entry of ``rows``."""
        starts, counts = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        owner = torch.repeat_interleave(torch.arange(len(rows)), counts)
        first = torch.cumsum(counts, 0) - counts  # where each row's entries begin in the output order
        position = torch.arange(int(counts.sum())) - first[owner] + starts[owner]
        return owner, position

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, int):
            return self[[rows]][0]
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        owner, position = self._entries(rows)
        dense = torch.zeros(len(rows), self.num_answers)
        dense[owner, self.answers[position]] = self.scores[position]
        return dense

    def gather(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """``dense.gather(1, index)`` for ``index (N, 1)``: each question's score of one answer, ``(N, 1)``."""
        if dim != 1 or tuple(index.shape) != (len(self), 1):
            raise ValueError(f"SparseTargets.gather: needs dim=1 and index ({len(self)}, 1), got {dim}, "
                             f"{tuple(index.shape)}")
        owner, position = self._entries(torch.arange(len(self)))
        hit = self.answers[position] == index.reshape(-1).cpu()[owner]
        out = torch.zeros(len(self), 1)
        out[owner[hit], 0] = self.scores[position[hit]]
        return out.to(index.device)

    def any(self) -> torch.Tensor:
        """Whether any question has a non-zero score (a split with ground-truth answers)."""
        return self.scores.any()


@dataclass
class Gather:
    """Example indices → a batch with uint8 images: what the DataLoader runs (in its workers, if any).

    The batch holds ``index``, each column's rows and, per image-key column, its images ``(B, H, W, 3)`` uint8 under
    the pixel key (:data:`IMAGE_KEYS`), transformed by ``augment(images, generator=...)`` if given, with one
    generator per batch seeded from ``seed`` and the indices themselves: a batch is augmented the same way whenever
    and wherever it is gathered (a resumed run replays it, on any number of processes and workers) and draws nothing
    from other streams. Holds what a batch needs only (not the texts), so little travels to spawned workers.
    """

    columns: dict[str, torch.Tensor | SparseTargets]
    images: ImageStore | torch.Tensor
    augment: Augment | None = None
    seed: int = 0

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"index": idx}
        generator = None
        if self.augment is not None:
            # torch's CPU generator keeps 32 bits of a seed: one CRC-32 over the seed and the indices
            generator = torch.Generator().manual_seed(zlib.crc32(np.array([self.seed, *indices], dtype=np.int64)))
        for key, values in self.columns.items():
            batch[key] = values[idx]
            if key in IMAGE_KEYS:
                images = self.images[batch[key]]
                if self.augment is not None:
                    images = self.augment(images, generator=generator)
                batch[IMAGE_KEYS[key]] = images
        return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device | None, pixel_norm: str) -> dict[str, torch.Tensor]:
    """A gathered batch on ``device`` (``None``: where it is; non-blocking from pinned memory), its uint8 images
    ``(B, H, W, 3)`` turned into float pixels ``(B, 3, H, W)`` there (:func:`to_pixels`): a quarter of the bytes
    cross to a GPU, and the conversion runs on it."""
    out = {}
    for key, value in batch.items():
        if device is not None:
            value = value.to(device, non_blocking=True)
        out[key] = to_pixels(value, pixel_norm) if key in PIXEL_KEYS and value.dtype == torch.uint8 else value
    return out


PIXEL_KEYS = frozenset(IMAGE_KEYS.values())


def _one_thread(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one intra-op thread per worker (the workers are the parallelism), and freed
    batches returned to the OS (:mod:`vldistill.memory`; a spawned worker does not inherit the setting)."""
    torch.set_num_threads(1)
    return_large_blocks()


class SplitLoader(DataLoader):
    """The DataLoader of a split: batches of indices from :class:`EpochBatches` (``batch_sampler``: ``set_epoch``
    picks the epoch's order, ``shard`` the process's share), gathered by :class:`Gather` in ``loading.num_workers``
    worker processes (persistent, ``prefetch_factor`` batches ahead each, one thread each; 0: in this process), then
    :func:`to_device`: iterating yields batches on :attr:`device` (set by ``device=`` or :meth:`to`; ``None``: the
    CPU) with float pixels. Pinned memory when the device is CUDA. The DataLoader has a generator of its own, so that
    iterating never draws from the global torch RNG (the stream dropout and masking use)."""

    def __init__(self, gather: Gather, batches: EpochBatches, pixel_norm: str, seed: int, loading: LoaderParams,
                 device: str | torch.device | None = None):
        workers = loading.num_workers
        super().__init__(Indices(batches.n), batch_sampler=batches, collate_fn=gather,
                         generator=torch.Generator().manual_seed(seed), num_workers=workers,
                         persistent_workers=workers > 0, prefetch_factor=loading.prefetch_factor if workers else None,
                         worker_init_fn=_one_thread if workers else None)
        self.pixel_norm = pixel_norm
        self.device: torch.device | None = None
        if device is not None:
            self.to(device)

    def to(self, device: str | torch.device) -> SplitLoader:
        """Deliver batches on ``device`` from now on (call before iterating); returns the loader."""
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda"
        return self

    def __iter__(self):
        for batch in super().__iter__():
            yield to_device(batch, self.device, self.pixel_norm)


@dataclass
class EncodedSplit:
    """One prepared split. ``columns`` maps batch keys to per-example tensors ``(N, ...)`` (VQA's ``targets``: a
    :class:`SparseTargets`); image-key columns (``image``, ``image_left``, ``image_right``) hold keys into
    ``images`` (an :class:`ImageStore`, or a uint8 tensor ``(M, H, W, 3)``) and become pixels ``(B, 3, H, W)`` in a
    batch. ``loading``: the DataLoader settings of :meth:`loader` (``data.loader``)."""

    columns: dict[str, torch.Tensor | SparseTargets]
    images: ImageStore | torch.Tensor
    pixel_norm: str
    texts: list[str]
    loading: LoaderParams = field(default_factory=LoaderParams)

    IMAGE_KEYS = IMAGE_KEYS

    def __len__(self) -> int:
        return len(self.texts)

    def collate(self, indices: list[int], augment: Augment | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """The batch of examples ``indices`` on the CPU, image columns as float pixels ``(B, 3, H, W)``: what
        :meth:`loader` yields for those indices (see :class:`Gather` for ``augment`` and ``seed``)."""
        return to_device(Gather(self.columns, self.images, augment, seed)(indices), None, self.pixel_norm)

    def loader(self, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
               augment: Augment | None = None, device: str | torch.device | None = None) -> SplitLoader:
        """Batches of ``batch_size`` from :class:`EpochBatches`, their images through ``augment`` if given (see
        :class:`Gather`), delivered on ``device`` (see :class:`SplitLoader`)."""
        batches = EpochBatches(len(self), batch_size, shuffle, seed, drop_last)
        return SplitLoader(Gather(self.columns, self.images, augment, seed), batches, self.pixel_norm, seed,
                           self.loading, device)

    def random_pixels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Pixels of ``n`` images drawn uniformly from the store (ITM negatives)."""
        keys = torch.randint(len(self.images), (n,), generator=generator)
        return to_pixels(self.images[keys], self.pixel_norm)


def load_split(root: str | Path, task: str, split: str, tokenizer, max_len: int, pixel_norm: str,
               loading: LoaderParams | None = None) -> EncodedSplit:
    """Read a prepared split, map its image store (nothing copied), tokenise every text once."""
    frame = read_split(root, task, split)
    images = ImageStore(read_images(root, task))
    texts = frame["text"].tolist()
    input_ids, attention_mask = tokenize(tokenizer, texts, max_len)
    columns = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in ("image", "image_left", "image_right", "label"):
        if key in frame:
            columns[key if key != "label" else "labels"] = torch.as_tensor(frame[key].to_numpy().copy(), dtype=torch.long)
    if "answers" in frame:  # VQA: soft-score targets over the answer vocabulary
        columns["targets"] = vqa_targets(frame, read_answers(root, task))
    return EncodedSplit(columns=columns, images=images, pixel_norm=pixel_norm, texts=texts,
                        loading=loading or LoaderParams())


def vqa_targets(frame, answers: list[str]) -> SparseTargets:
    """Each question's soft score per answer of the vocabulary, sparse (answers it never got, or outside the
    vocabulary, score 0; an answer listed twice keeps its last score)."""
    index = {a: i for i, a in enumerate(answers)}
    offsets, columns, values = [0], [], []
    for names, scores in zip(frame["answers"], frame["scores"]):
        row = {}
        for name, score in zip(names, scores):
            if name in index:
                row[index[name]] = float(score)
        columns += row.keys()
        values += row.values()
        offsets.append(len(columns))
    return SparseTargets(torch.tensor(offsets, dtype=torch.long), torch.tensor(columns, dtype=torch.long),
                         torch.tensor(values, dtype=torch.float32), len(answers))
