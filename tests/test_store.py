"""The image store is written in place: the same bytes as ``np.save(np.stack(images))`` whatever the number of
decoding processes, with memory far below the store's size; unreadable official images stop ``prepare`` naming the
file, or, with ``skip_bad_images``, drop their examples (listed in the metrics file) up to ``max_bad_fraction``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import large_fixture
from vldistill.config import Nlvr2Data, PretrainData, RetrievalData, SceneParams, SnliVeData, SplitSizes
from vldistill.data import prepared
from vldistill.data.official import DataError, load_image
from vldistill.data.prepared import StoreWriter, prepare, read_images, read_split, store_path

SIZE = [32, 48]


class _Images(list):
    """What the generators wrote into before: a list of every image (``append`` returns the key, as the store's)."""

    def append(self, image):
        super().append(image)
        return len(self) - 1


def _saved(images: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.stack(images))
    return buffer.getvalue()


@pytest.mark.parametrize("count", [1, 9, 10, 100])  # the header is rewritten with a count of more digits
def test_store_writer_writes_the_bytes_of_np_save(tmp_path, count):
    rng = np.random.default_rng(count)
    images = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(count)]
    with StoreWriter(tmp_path / "images.npy") as store:
        keys = [store.append(image) for image in images]
    assert keys == list(range(count))
    assert (tmp_path / "images.npy").read_bytes() == _saved(images)


def test_store_writer_refuses_a_different_shape(tmp_path):
    with pytest.raises(ValueError, match="image 1 has shape"), StoreWriter(tmp_path / "images.npy") as store:
        store.append(np.zeros((4, 4, 3), np.uint8))
        store.append(np.zeros((4, 5, 3), np.uint8))


@pytest.mark.parametrize("task, cfg, generate", [
    ("pretrain", PretrainData(images=SplitSizes(train=12, dev=3, test=3)), prepared._generate_pretrain),
    ("nlvr2", Nlvr2Data(pairs=SplitSizes(train=12, dev=3, test=3)), prepared._generate_nlvr2),
    ("snli_ve", SnliVeData(pairs=SplitSizes(train=12, dev=3, test=3)), prepared._generate_snli_ve),
    ("retrieval", RetrievalData(images=SplitSizes(train=12, dev=3, test=3)), prepared._generate_retrieval)])
def test_generated_store_is_what_np_stack_saved(tmp_path, task, cfg, generate):
    """The embedded default's store, streamed image by image, has the bytes the list + np.stack + np.save wrote."""
    prepare(task, cfg, SceneParams(), 0, tmp_path, tmp_path / "stats.json")
    images = _Images()
    frames = generate(cfg, SceneParams(), 0, images)
    assert store_path(tmp_path, task).read_bytes() == _saved(images)
    for split, frame in frames.items():
        pd.testing.assert_frame_equal(read_split(tmp_path, task, split), frame)


PAIRS = {"train": 60, "dev": 6, "test": 6}  # 144 images: three decoding chunks


@pytest.fixture(scope="module")
def nlvr2_root(tmp_path_factory):
    return large_fixture.nlvr2(tmp_path_factory.mktemp("nlvr2"), PAIRS, source_size=(24, 20))


def _cfg(root, **knobs):
    return Nlvr2Data(source="official", root=str(root), image_size=SIZE, **knobs)


def test_official_store_bytes_do_not_depend_on_workers(tmp_path, nlvr2_root):
    """In-process and two spawned decoders fill the store with the bytes of np.save of every image decoded in key
    order (what prepare did before: a list, np.stack, np.save)."""
    stored = {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}"
        prepare("nlvr2", _cfg(nlvr2_root, decode_workers=workers), SceneParams(), 0, out, out / "stats.json")
        stored[workers] = store_path(out, "nlvr2").read_bytes()
    frames = {s: read_split(tmp_path / "workers0", "nlvr2", s) for s in ("train", "dev", "test")}
    paths = []
    for split, frame in frames.items():
        for i, directory in enumerate(frame.index % 10):
            paths += large_fixture.image_paths(nlvr2_root, split, i, directory)
    assert list(frames["train"]["image_left"]) == list(range(0, 2 * PAIRS["train"], 2))
    assert stored[0] == stored[2] == _saved([load_image(p, tuple(SIZE)) for p in paths])


# ------------------------------------------------------------------------------------------------- bad images
@pytest.fixture
def one_bad(tmp_path, nlvr2_root):
    """A copy of the set with the right image of train statement 7 truncated."""
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(nlvr2_root, root)
    return root, large_fixture.truncate(large_fixture.image_paths(root, "train", 7, 7)[1])


def test_bad_image_stops_prepare_naming_it(tmp_path, one_bad):
    root, bad = one_bad
    with pytest.raises(DataError) as info:
        prepare("nlvr2", _cfg(root, decode_workers=2), SceneParams(), 0, tmp_path / "out", tmp_path / "stats.json")
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "cannot decode" in message and "train.json:8" in message
    assert not (tmp_path / "out/nlvr2").exists() and not list((tmp_path / "out").iterdir())  # no staging left


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_images_drops_their_examples_and_lists_them(tmp_path, nlvr2_root, one_bad, workers):
    root, bad = one_bad
    clean, out = tmp_path / "clean", tmp_path / "out"
    prepare("nlvr2", _cfg(nlvr2_root), SceneParams(), 0, clean, tmp_path / "clean.json")
    stats = prepare("nlvr2", _cfg(root, decode_workers=workers, skip_bad_images=True, max_bad_fraction=0.01),
                    SceneParams(), 0, out, tmp_path / "stats.json")
    written = json.loads((tmp_path / "stats.json").read_text())
    assert written["dropped_examples"] == {"train": 1, "dev": 0, "test": 0} == stats["dropped_examples"]
    assert [s["path"] for s in written["skipped_images"]] == [str(bad)]
    assert "cannot decode" in written["skipped_images"][0]["reason"]
    assert "train.json:8" in written["skipped_images"][0]["referenced_by"]
    before, after = read_images(clean, "nlvr2"), read_images(out, "nlvr2")
    assert len(after) == len(before) - 1 == written["image_store"]["images"]  # no hole left in the store
    for split in ("train", "dev", "test"):
        old, new = read_split(clean, "nlvr2", split), read_split(out, "nlvr2", split)
        kept = old[old["identifier"] != "train-7-0-0"].reset_index(drop=True)
        pd.testing.assert_frame_equal(new.drop(columns=["image_left", "image_right"]),
                                      kept.drop(columns=["image_left", "image_right"]))
        for column in ("image_left", "image_right"):
            assert (after[new[column].to_numpy()] == before[kept[column].to_numpy()]).all(), (split, column)


def test_skip_bad_images_stops_above_the_fraction(tmp_path, one_bad):
    root, first = one_bad
    for i in (20, 30):
        large_fixture.truncate(large_fixture.image_paths(root, "train", i, i % 10)[0])
    cfg = _cfg(root, skip_bad_images=True, max_bad_fraction=0.01)  # 144 images: at most 1 may be left out
    with pytest.raises(DataError) as info:
        prepare("nlvr2", cfg, SceneParams(), 0, tmp_path / "out", tmp_path / "stats.json")
    message = str(info.value)
    assert "\n" not in message and "2 of 144 images" in message and str(first) in message
    assert "data.nlvr2.max_bad_fraction" in message
    assert not (tmp_path / "out/nlvr2").exists() and not (tmp_path / "stats.json").exists()



def test_skip_bad_images_drops_every_caption_of_an_image(tmp_path):
    """Karpathy-style retrieval: the five captions of the one unreadable image go, the other images' stay."""
    from test_official import karpathy_fixture

    root = karpathy_fixture(tmp_path / "flickr30k", "flickr30k")
    large_fixture.truncate(root / "flickr30k_images/1.jpg")  # the restval image: joins train
    cfg = RetrievalData(source="official", root=str(root), image_size=SIZE, skip_bad_images=True,
                        max_bad_fraction=0.25)
    stats = prepare("retrieval", cfg, SceneParams(), 0, tmp_path / "out", tmp_path / "stats.json")
    train = read_split(tmp_path / "out", "retrieval", "train")
    assert stats["dropped_examples"] == {"train": 5, "dev": 0, "test": 0}
    assert list(train["text"]) == [f"caption 0.{k}" for k in range(5)] and set(train["image"]) == {0}
    assert sorted(read_split(tmp_path / "out", "retrieval", "test")["image"].unique()) == [2]  # 3 images left


def test_bad_image_knobs_are_checked(tmp_path):
    from vldistill.config import ConfigError, load

    from conftest import ROOT

    for override, knob in (("data.nlvr2.max_bad_fraction=1.5", "data.nlvr2.max_bad_fraction"),
                           ("data.vqa.decode_workers=-1", "data.vqa.decode_workers"),
                           ("data.snli_ve.skip_bad_images=maybe", "data.snli_ve.skip_bad_images")):
        with pytest.raises(ConfigError) as info:
            load(ROOT / "params.yaml", [override])
        assert knob in str(info.value) and "\n" not in str(info.value), str(info.value)

# ------------------------------------------------------------------------------------------------- memory
def _anonymous(pid: int) -> int:
    """Resident anonymous memory of a process in bytes (``RssAnon``: heap, stacks, private copies; not the page-cache
    pages of a memory-mapped file, which ``VmRSS`` and ``Private_Dirty`` also count), 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def _peak_anonymous(args: list[str]) -> tuple[int, int, int]:
    """Run ``args``; sample every 10 ms the anonymous memory of it and its children (the decoding processes).
    Returns the peaks ``(main process, largest child, all together)``."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"main": 0, "child": 0, "tree": 0}

    def sample():
        while process.poll() is None:
            children = [_anonymous(c) for c in _children(process.pid)]
            main = _anonymous(process.pid)
            peaks["main"] = max(peaks["main"], main)
            peaks["child"] = max([peaks["child"], *children])
            peaks["tree"] = max(peaks["tree"], main + sum(children))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = process.communicate(timeout=300)
    sampler.join()
    assert process.returncode == 0, err[-2000:]
    return peaks["main"], peaks["child"], peaks["tree"]


@pytest.mark.slow  # ~30 s on a loaded 2-core machine
def test_prepare_then_training_memory_stays_far_below_the_store(tmp_path):
    """An official NLVR2 set whose store (800 images at the paper's 384x640: 563 MB) is several times what prepare
    may hold: the prepare process and each of its two decoding processes keep a small fraction of it in anonymous
    memory (the store's pages are the file's, in the page cache, shared and reclaimable). Before, prepare held
    every decoded image twice (a list, then np.stack): over twice the store. Training and evaluating on the prepared
    task then grow the stage's anonymous memory by a small fraction of the store too (the loader before copied the
    whole store for every split)."""
    pairs, image_size = {"train": 300, "dev": 50, "test": 50}, [384, 640]
    root = large_fixture.nlvr2(tmp_path / "nlvr2", pairs)
    store = large_fixture.store_bytes(pairs, image_size)
    code = ("import sys; from vldistill.config import Nlvr2Data, SceneParams; "
            "from vldistill.data.prepared import prepare; "
            f"cfg = Nlvr2Data(source='official', root=sys.argv[1], image_size={image_size}, decode_workers=2); "
            "prepare('nlvr2', cfg, SceneParams(), 0, sys.argv[2], sys.argv[3])")
    idle = _peak_anonymous([sys.executable, "-c", "import vldistill.data.prepared, vldistill.config"])[0]
    main, child, tree = _peak_anonymous([sys.executable, "-c", code, str(root), str(tmp_path / "out"),
                                         str(tmp_path / "stats.json")])
    written = store_path(tmp_path / "out", "nlvr2").stat().st_size
    mb = 2 ** 20
    print(f"\nprepare memory: store {written / mb:.0f} MB; peak anonymous: prepare process {main / mb:.0f} MB "
          f"(its imports alone: {idle / mb:.0f} MB), largest decoding process {child / mb:.0f} MB, all processes "
          f"together {tree / mb:.0f} MB")
    assert written > store and child > 0  # the whole store was written, by worker processes
    assert main < store / 4 and child < store / 4 and tree < store / 2
    # then train and evaluate on what prepare wrote (tests/test_memory.py's script): the stage maps the store
    from test_memory import BOUND, run_on_store

    trained = run_on_store(tmp_path / "out", workers=0, store_mb=0, batch=2)  # a batch of 384x640 pairs: 12 MB float
    growth = trained["peak_mb"] - trained["baseline_mb"]
    print(f"training + evaluation on it: private memory {trained['baseline_mb']:.0f} MB before loading, peak "
          f"{trained['peak_mb']:.0f} MB (+{growth:.0f} MB) over {trained['steps']} steps and "
          f"{trained['dev_examples']} dev pairs")
    assert trained["steps"] == pairs["train"] // 2 and trained["store_mb"] * mb >= store
    assert growth < BOUND * trained["store_mb"], trained
