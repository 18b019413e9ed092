"""RandAugment on uint8 image batches, as ViLT fine-tunes (``train.augment``).

torchvision's ``v2.RandAugment`` draws its ops and signs from torch's global generator; :func:`randaugment` runs it
inside a forked RNG seeded from the caller's ``torch.Generator``, so a batch is augmented the same way for the same
generator state and the global stream (dropout, masking) is left untouched. Each image draws its own ops.
Its op space already leaves out the two ops ViLT removes (colour inversion, because texts name colours, and cutout);
geometric ops fill uncovered pixels with 0, the colour of the padding that official images get at prepare time.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from vldistill.config import AugmentParams


def randaugment(images: torch.Tensor, num_ops: int, magnitude: int, generator: torch.Generator) -> torch.Tensor:
    """RandAugment every image of ``images`` independently.

    images: uint8 ``(B, H, W, 3)`` → uint8 ``(B, H, W, 3)`` (a new tensor; the input is not modified).
    ``num_ops`` ops per image at ``magnitude`` (0–30, torchvision's 31 bins); one draw from ``generator`` seeds
    the whole batch.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, fill=0)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([transform(image.permute(2, 0, 1)) for image in images])
    return out.permute(0, 2, 3, 1).contiguous()


def augment_images(images: torch.Tensor, params: AugmentParams, stage: str, generator: torch.Generator) -> torch.Tensor:
    """``train.augment`` applied to a training batch of ``stage``: :func:`randaugment` when enabled for that stage,
    else ``images`` itself (identity, no draw from ``generator``). uint8 ``(B, H, W, 3)`` → same."""
    if not params.randaugment or stage not in params.stages:
        return images
    return randaugment(images, params.num_ops, params.magnitude, generator)
