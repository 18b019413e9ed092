"""RandAugment on uint8 batches: changes pixels, keeps shape and dtype, reproducible per seed, identity when off."""

from __future__ import annotations

import pytest
import torch

from vldistill.config import AugmentParams
from vldistill.data.augment import augment_images, randaugment


def _images(b: int = 6, h: int = 24, w: int = 40) -> torch.Tensor:
    """Random uint8 images with a black padded band, as official images after prepare."""
    images = torch.randint(0, 256, (b, h, w, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, :, -8:] = 0
    return images


def test_randaugment_changes_pixels_and_keeps_shape_and_dtype():
    images = _images()
    before = images.clone()
    out = randaugment(images, num_ops=2, magnitude=9, generator=torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(images, before)  # the input is not modified
    changed = (out != images).flatten(1).any(dim=1)
    assert changed.sum() >= len(images) - 1  # at most an image drawing Identity twice (p = 1/196) stays as is


def test_randaugment_is_reproducible_and_leaves_global_rng_alone():
    images = _images()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = randaugment(images, 2, 9, torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(3), expected_next)  # the global stream (dropout, masking) is untouched
    b = randaugment(images, 2, 9, torch.Generator().manual_seed(7))
    c = randaugment(images, 2, 9, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_images_of_a_batch_draw_their_own_ops():
    same = _images(b=1).expand(8, -1, -1, -1).contiguous()
    out = randaugment(same, 2, 9, torch.Generator().manual_seed(0))
    assert len({out[i].numpy().tobytes() for i in range(len(out))}) > 1


@pytest.mark.parametrize("params, stage", [
    (AugmentParams(), "teacher_finetune"),  # the embedded default: off
    (AugmentParams(randaugment=True, stages=["teacher_finetune"]), "distill_finetune"),
])
def test_disabled_augmentation_is_the_identity(params, stage):
    images = _images()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert augment_images(images, params, stage, generator) is images
    assert torch.equal(generator.get_state(), state)  # no draw: the data stream is the same as without augment


def test_enabled_augmentation_matches_randaugment():
    images = _images()
    params = AugmentParams(randaugment=True, num_ops=3, magnitude=12)
    got = augment_images(images, params, "distill_finetune", torch.Generator().manual_seed(4))
    assert torch.equal(got, randaugment(images, 3, 12, torch.Generator().manual_seed(4)))


def test_rejects_float_or_channels_first_images():
    with pytest.raises(ValueError, match="uint8"):
        randaugment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 2, 9, torch.Generator())
    with pytest.raises(ValueError, match="uint8"):
        randaugment(torch.zeros(2, 8, 8, 3), 2, 9, torch.Generator())


def _pair_split(n: int = 16):
    """An NLVR2-like split: two image columns over a store of ``n`` random images."""
    from vldistill.data.datasets import EncodedSplit

    left = torch.arange(n)
    return EncodedSplit(columns={"image_left": left, "image_right": left.flip(0), "labels": left % 2},
                        images=_images(n, 24, 24), pixel_norm="unit", texts=[""] * n)


def test_training_loader_augments_its_images_replayably_and_only_when_asked():
    """``loader(augment=...)`` RandAugments the gathered images of every image column before ``to_pixels``: the same
    indices give the same pixels whenever collated (a resumed run replays them), the pixels differ from the plain
    ones, and the loader without ``augment`` (dev, test, pre-training) gives exactly the stored images."""
    from functools import partial

    from vldistill.data.datasets import to_pixels

    split = _pair_split()
    augment = partial(augment_images, params=AugmentParams(randaugment=True), stage="distill_finetune")
    plain = next(iter(split.loader(4, shuffle=False, seed=0)))
    first = next(iter(split.loader(4, shuffle=False, seed=0, augment=augment)))
    again = next(iter(split.loader(4, shuffle=False, seed=0, augment=augment)))
    other_seed = next(iter(split.loader(4, shuffle=False, seed=1, augment=augment)))
    assert torch.equal(plain["pixel_values_left"], to_pixels(split.images[:4], "unit"))
    for key in ("pixel_values_left", "pixel_values_right"):
        assert first[key].shape == plain[key].shape == (4, 3, 24, 24)
        assert torch.equal(first[key], again[key])
        assert not torch.equal(first[key], plain[key])
        assert not torch.equal(first[key], other_seed[key])
    assert torch.equal(first["labels"], plain["labels"])


@pytest.mark.parametrize("augment, stage, on", [
    (AugmentParams(), "teacher_finetune", False),
    (AugmentParams(randaugment=True), "teacher_finetune", True),
    (AugmentParams(randaugment=True), "distill_finetune", True),
    (AugmentParams(randaugment=True, stages=["teacher_finetune"]), "distill_finetune", False),
    (AugmentParams(randaugment=True), "teacher_pretrain", False),
])
def test_training_stages_augment_as_train_augment_says(augment, stage, on):
    from vldistill.config import Params
    from vldistill.train.runs import _augment

    params = Params.model_validate({"train": {"augment": augment.model_dump()},
                                    "distill": {"cache_teacher": False}})
    assert (_augment(params, stage) is not None) == on
