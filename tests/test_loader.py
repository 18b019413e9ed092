"""The split loader: the image store is mapped, never copied or pickled; batches (augmented or not) are the same for
0, 1 and 2 DataLoader workers and the same as from an in-memory store; VQA targets are sparse and densify exactly;
batches reach the device with float pixels."""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from vldistill.config import AugmentParams, LoaderParams, Nlvr2Data, SceneParams, SplitSizes
from vldistill.data.augment import augment_images
from vldistill.data.datasets import EncodedSplit, ImageStore, SparseTargets, load_split, vqa_targets
from vldistill.data.prepared import prepare, read_split
from vldistill.data.tokenizer import train_tokenizer

AUGMENT = partial(augment_images, params=AugmentParams(randaugment=True), stage="distill_finetune")


@pytest.fixture(scope="module")
def nlvr2(tmp_path_factory):
    """A prepared NLVR2 set (two image columns) and a tokenizer of its texts."""
    root = tmp_path_factory.mktemp("prepared")
    prepare("nlvr2", Nlvr2Data(pairs=SplitSizes(train=72, dev=8, test=8)), SceneParams(), 0, root, root / "m.json")
    return root, train_tokenizer(read_split(root, "nlvr2", "train")["text"], 200, 18)


def _split(nlvr2, workers: int = 0) -> EncodedSplit:
    root, tokenizer = nlvr2
    return load_split(root, "nlvr2", "train", tokenizer, 18, "vilt", LoaderParams(num_workers=workers))


def _epoch(loader, epoch: int, skip: int = 0) -> list[dict]:
    loader.batch_sampler.set_epoch(epoch, skip)
    return list(loader)


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y)
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_the_store_is_mapped_and_pickles_as_its_path(nlvr2):
    split = _split(nlvr2)
    assert isinstance(split.images, ImageStore) and isinstance(split.images.array(), np.memmap)
    assert split.images.nbytes > 500_000
    for obj in (split.images, split.loader(8, True, 0).collate_fn):  # what a spawned DataLoader worker receives
        assert len(pickle.dumps(obj)) < split.images.nbytes / 20
    again = pickle.loads(pickle.dumps(split.images))
    keys = torch.tensor([5, 0, 5, 17])
    assert torch.equal(again[keys], split.images[keys]) and again[keys].shape == (4, *split.images.shape[1:])
    assert again[keys].dtype == torch.uint8 and again[keys].is_contiguous()
    assert torch.equal(split.images[3], torch.from_numpy(np.load(again.path)[3]))
    assert torch.equal(split.images[[1, 2]], split.images[torch.tensor([1, 2])])


@pytest.mark.parametrize("augment", [None, AUGMENT], ids=["plain", "randaugment"])
def test_batches_do_not_depend_on_workers_or_on_the_store_being_mapped(nlvr2, augment):
    """Shuffled, sharded, skipped-into epochs: 0, 1 and 2 workers over the mapped store give exactly the batches of
    an in-memory store (the split as it was held before) in the main process, and of ``collate``; the global torch
    RNG (dropout, masking) is not touched by iterating, whatever the workers."""
    mapped = {w: _split(nlvr2, w) for w in (0, 1, 2)}
    in_memory = EncodedSplit(mapped[0].columns, torch.from_numpy(np.array(mapped[0].images.array())),
                             "vilt", mapped[0].texts)
    reference = in_memory.loader(4, True, 3, drop_last=True, augment=augment)
    reference.batch_sampler.shard(1, 2, accumulate=2)
    expected = _epoch(reference, 1, skip=1)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    for workers, split in mapped.items():
        loader = split.loader(4, True, 3, drop_last=True, augment=augment)
        loader.batch_sampler.shard(1, 2, accumulate=2)
        assert loader.num_workers == workers and loader.persistent_workers == (workers > 0)
        _same(_epoch(loader, 1, skip=1), expected)
        _same(_epoch(loader, 1, skip=1), expected)  # persistent workers, second pass
    assert torch.equal(torch.get_rng_state(), state)
    collated = [mapped[0].collate(batch["index"].tolist(), augment=augment, seed=3) for batch in expected]
    _same(collated, expected)
    pixels = expected[0]["pixel_values_left"]
    assert pixels.dtype == torch.float32 and pixels.shape[1] == 3 and pixels.min() >= -1 and pixels.max() <= 1


def test_workers_gather_uint8_and_the_device_gets_float_pixels(nlvr2):
    split = _split(nlvr2, workers=1)
    loader = split.loader(4, False, 0)
    gathered = loader.collate_fn([0, 1, 2, 3])  # what a worker hands over: a quarter of the float bytes
    assert gathered["pixel_values_left"].dtype == torch.uint8 and gathered["pixel_values_left"].shape[-1] == 3
    assert loader.device is None and not loader.pin_memory
    assert loader.to("cpu") is loader and loader.device == torch.device("cpu") and not loader.pin_memory
    batch = next(iter(loader))
    assert batch["pixel_values_left"].dtype == torch.float32 and batch["pixel_values_left"].shape[1] == 3
    assert split.loader(4, False, 0, device="cuda").pin_memory  # pinned host memory only for a CUDA device


def _dense_targets(frame, answers: list[str]) -> torch.Tensor:
    """The dense ``(N, A)`` targets as load_split built them before they became sparse."""
    index = {a: i for i, a in enumerate(answers)}
    targets = torch.zeros(len(frame), len(answers))
    for row, (names, scores) in enumerate(zip(frame["answers"], frame["scores"])):
        for name, score in zip(names, scores):
            if name in index:
                targets[row, index[name]] = float(score)
    return targets


def test_sparse_vqa_targets_densify_exactly_and_score_as_the_dense_ones():
    answers = ["yes", "no", "2", "red", "blue"]
    frame = pd.DataFrame({"answers": [["yes"], ["red", "blue", "red"], [], ["unknown", "2"], ["no", "yes"]],
                          "scores": [[1.0], [0.6, 0.3, 0.9], [], [1.0, 0.3], [0.1, 0.7]]})
    dense, sparse = _dense_targets(frame, answers), vqa_targets(frame, answers)
    assert isinstance(sparse, SparseTargets) and sparse.shape == tuple(dense.shape) and len(sparse) == len(frame)
    assert torch.equal(sparse[torch.arange(len(frame))], dense)
    rows = torch.tensor([4, 1, 1, 0])
    assert torch.equal(sparse[rows], dense[rows]) and torch.equal(sparse[1:3], dense[1:3])
    assert torch.equal(sparse[1], dense[1])
    for best in (torch.tensor([[0], [3], [2], [2], [1]]), torch.tensor([[1], [4], [0], [0], [0]])):
        assert torch.equal(sparse.gather(1, best), dense.gather(1, best))
    assert bool(sparse.any()) and not bool(vqa_targets(frame.iloc[2:3], answers).any())
    with pytest.raises(ValueError, match="gather"):
        sparse.gather(0, torch.zeros(5, 1, dtype=torch.long))


def test_a_batch_of_vqa_questions_carries_dense_targets():
    targets = vqa_targets(pd.DataFrame({"answers": [["a"], ["b", "a"], ["b"]], "scores": [[1.0], [0.3, 0.6], [0.9]]}),
                          ["a", "b"])
    split = EncodedSplit({"image": torch.tensor([0, 1, 0]), "targets": targets},
                         torch.zeros(2, 4, 4, 3, dtype=torch.uint8), "unit", ["q0", "q1", "q2"])
    batch = next(iter(split.loader(2, False, 0)))
    assert torch.equal(batch["targets"], torch.tensor([[1.0, 0.0], [0.6, 0.3]]))
    from vldistill.evaluate.metrics import vqa_score
    from vldistill.evaluate.predictions import answered

    assert answered(split)  # whole-split uses take the sparse targets as they took the dense ones
    assert vqa_score(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), targets) == pytest.approx((0 + 0.6 + 0.9) / 3)


def test_loader_benchmark_prints_a_rate_per_workers_and_augmentation(capsys):
    from conftest import ROOT
    from vldistill.bench.loader import main

    main(["--height", "24", "--width", "40", "--images", "24", "--batch-size", "4", "--batches", "2",
          "--workers", "0,1", "--params", str(ROOT / "params.paper.yaml"), "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    loader_rows = [line.split("|")[1:-1] for line in lines if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert [(w.strip(), a.strip()) for w, a, _ in loader_rows] == [("0", "off"), ("1", "off"), ("0", "on"),
                                                                  ("1", "on")]
    core_rows = [line.split("|")[1:-1] for line in lines if line.startswith("| off ") or line.startswith("| on ")]
    assert len(core_rows) == 2
    for rate in [r[2] for r in loader_rows] + [r[1] for r in core_rows]:
        assert float(rate.replace(",", "")) > 0


def test_a_spawned_worker_maps_the_store_itself_and_gathers_the_same_batches(nlvr2):
    """Under ``spawn`` (macOS, or a CUDA process that must not fork) the worker gets the pickled :class:`Gather`:
    the store's path, not its bytes; it maps the file and gathers exactly what the training process would."""
    from torch.utils.data import DataLoader

    split = _split(nlvr2)
    loader = split.loader(8, True, 5, drop_last=True, augment=AUGMENT)
    spawned = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler, collate_fn=loader.collate_fn,
                         num_workers=1, multiprocessing_context="spawn", generator=torch.Generator())
    _same(list(spawned), [loader.collate_fn(indices) for indices in loader.batch_sampler])
