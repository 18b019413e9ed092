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
