"""Images per second the training loader delivers, per number of DataLoader workers, with and without RandAugment.

    python -m vldistill.bench.loader                       # 384x640 (paper size), workers 0,1,2, RandAugment off/on
    python -m vldistill.bench.loader --workers 0,4,8 --device cuda

It writes a temporary store of random uint8 images (``images.npy``, as ``prepare`` does) and runs the path a
training stage runs: :meth:`EncodedSplit.loader` over the memory-mapped store (shuffled batches, the gather and
RandAugment in the workers, ``train.augment`` of the params file, stage ``distill_finetune``), then the transfer to
``--device`` and the float conversion there. The first batch (worker start) is not timed. The store was just
written, so it is read from the page cache: the rate of a warm epoch, not of a cold disk. A second table gives what
one worker delivers per CPU-second (its process CPU clock, so it holds on a busy machine too) and the cores a GPU
consuming 1,000 or 3,000 images/s needs at that rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from vldistill.config import AugmentParams, LoaderParams
from vldistill.data.augment import augment_images
from vldistill.data.datasets import EncodedSplit, Gather, ImageStore

STAGE = "distill_finetune"


def write_store(path: Path, n: int, height: int, width: int, seed: int = 0) -> ImageStore:
    """``n`` random uint8 images ``(H, W, 3)`` written to ``path`` (``.npy``) one at a time, then mapped."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, height, width, 3))
    rng = np.random.default_rng(seed)
    for i in range(n):
        array[i] = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    array.flush()
    del array
    return ImageStore.open(path)


def images_per_second(store: ImageStore, batch_size: int, batches: int, workers: int,
                      augment: AugmentParams | None, device: str) -> float:
    """Images per second over ``batches`` timed batches (after one untimed) of a one-image-per-example split."""
    n = len(store)
    split = EncodedSplit({"image": torch.arange(n)}, store, "vilt", [""] * n, LoaderParams(num_workers=workers))
    fn = None if augment is None else partial(augment_images, params=augment, stage=STAGE)
    loader = split.loader(batch_size, True, 0, drop_last=True, augment=fn, device=device)
    if len(loader) < batches + 1:
        raise ValueError(f"--images {n}: needs at least (batches + 1) x batch_size = {(batches + 1) * batch_size}")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    iterator = iter(loader)
    next(iterator)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    sync()
    seconds = time.perf_counter() - start
    assert batch["pixel_values"].dtype == torch.float32
    del iterator, loader  # stops the workers
    return batches * batch_size / seconds


def gather_cpu_rate(store: ImageStore, batch_size: int, batches: int, augment: AugmentParams | None) -> float:
    """Images per CPU-second of what one worker runs per batch (:class:`Gather`: the copy out of the store and
    RandAugment), measured with this process's CPU clock: the rate of one worker that has a core to itself, however
    busy the machine is."""
    fn = None if augment is None else partial(augment_images, params=augment, stage=STAGE)
    gather = Gather({"image": torch.arange(len(store))}, store, fn, 0)
    order = torch.randperm(len(store), generator=torch.Generator().manual_seed(0)).tolist()
    gather(order[:batch_size])  # untimed: first touch of the pages
    start = time.process_time()
    for i in range(batches):
        gather(order[(i * batch_size) % len(order):][:batch_size])
    return batches * batch_size / (time.process_time() - start)


def loader_table(store: ImageStore, batch_size: int, batches: int, workers: list[int], augment: AugmentParams,
                 device: str) -> list[dict]:
    """One row per (workers, RandAugment off/on): ``{"workers", "randaugment", "images_per_s"}``."""
    return [{"workers": w, "randaugment": on,
             "images_per_s": images_per_second(store, batch_size, batches, w, augment if on else None, device)}
            for on in (False, True) for w in workers]


def format_table(rows: list[dict], per_core: dict[bool, float], height: int, width: int, batch_size: int,
                 device: str) -> str:
    lines = [f"loader images/s at {height}x{width}, batch {batch_size}, device {device} (wall clock)",
             "| workers | RandAugment | images/s |", "|---:|:---:|---:|"]
    lines += [f"| {r['workers']} | {'on' if r['randaugment'] else 'off'} | {r['images_per_s']:,.0f} |" for r in rows]
    lines += ["", "one worker, images per CPU-second (gather + RandAugment; per core it has to itself)",
              "| RandAugment | images/s per core | cores per GPU at 1,000 / 3,000 images/s |", "|:---:|---:|---:|"]
    lines += [f"| {'on' if on else 'off'} | {rate:,.0f} | {1000 / rate:.1f} / {3000 / rate:.1f} |"
              for on, rate in per_core.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--images", type=int, default=320, help="images in the temporary store")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", default="params.paper.yaml", help="train.augment comes from this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args(argv)
    from vldistill.config import ConfigError, load

    try:
        workers = [int(w) for w in args.workers.split(",")]
        augment = load(args.params).train.augment.model_copy(update={"randaugment": True})
    except (ValueError, ConfigError) as err:
        parser.error(str(err).splitlines()[0])
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="vldistill-loader-") as tmp:
        store = write_store(Path(tmp) / "images.npy", args.images, args.height, args.width)
        rows = loader_table(store, args.batch_size, args.batches, workers, augment, args.device)
        per_core = {on: gather_cpu_rate(store, args.batch_size, args.batches, augment if on else None)
                    for on in (False, True)}
    print(format_table(rows, per_core, args.height, args.width, args.batch_size, args.device))


if __name__ == "__main__":
    main()
