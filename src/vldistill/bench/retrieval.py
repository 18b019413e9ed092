"""Cost of scoring a retrieval gallery of N images × 5N captions (every caption against every image) as N grows.

- Dual encoder: every image and every caption encoded once, then one similarity matrix ``(5N, N)``
  (:func:`dual_scores`, as ``evaluate`` scores retrieval). Measured end to end when affordable (embedded size);
  at paper size on CPU, extrapolated from the measured cost per image, per caption and of the matrix itself:
  ``dual_s = N·per_image_s + 5N·per_caption_s + matrix_s(N)`` (:func:`extrapolate_dual_s`).
- Fusion teacher: one joint pass per (caption, image) pair, 5N² of them: the cost per pair is measured on a sample of
  pairs and multiplied out (``teacher_s = 5N²·per_pair_s``, :func:`extrapolate_teacher_s`).

Inputs are synthetic (random ids, random pixels): the cost does not depend on their values.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from vldistill.bench.paper import synthetic_images, synthetic_texts
from vldistill.bench.timing import Timer

SIZES = (100, 300, 1000, 5000)
"""Gallery sizes N (images); ``bench.retrieval_max`` keeps those up to it."""
CAPTIONS_PER_IMAGE = 5


def gallery_sizes(retrieval_max: int) -> list[int]:
    return [n for n in SIZES if n <= retrieval_max]


@dataclass(frozen=True)
class Inputs:
    """Synthetic retrieval inputs: ``images (N, 3, H, W)``, ``ids`` / ``mask`` ``(5N, T)`` (caption ``c`` belongs to
    image ``c // 5``)."""

    images: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def make(cls, n: int, text_len: int, vocab_size: int, image_size, seed: int = 0) -> "Inputs":
        generator = torch.Generator().manual_seed(seed)
        ids, mask = synthetic_texts(CAPTIONS_PER_IMAGE * n, text_len, vocab_size, generator)
        return cls(synthetic_images(n, image_size, generator), ids, mask)

    def first(self, n: int) -> "Inputs":
        """The gallery of the first ``n`` images and their captions."""
        return Inputs(self.images[:n], self.ids[:CAPTIONS_PER_IMAGE * n], self.mask[:CAPTIONS_PER_IMAGE * n])


@dataclass(frozen=True)
class TeacherCost:
    per_pair_s: float    # median seconds per (caption, image) joint pass
    pairs_sampled: int   # pairs timed (pairs per call × timed calls)


@dataclass(frozen=True)
class DualCost:
    per_image_s: float    # median seconds to encode one image (image tower, in batches)
    per_caption_s: float  # median seconds to encode one caption (text tower, in batches)


def dual_scores(student, inputs: Inputs, batch_size: int) -> torch.Tensor:
    """Every caption against every image with the dual encoder: towers in batches of ``batch_size``, then
    ``itc_logits`` → ``(5N, N)``."""
    texts = torch.cat([student.encode_text(inputs.ids[i:i + batch_size], inputs.mask[i:i + batch_size]).cls
                       for i in range(0, len(inputs.ids), batch_size)])
    images = torch.cat([student.encode_image(inputs.images[i:i + batch_size]).cls
                        for i in range(0, len(inputs.images), batch_size)])
    return student.itc_logits(texts, images)


def teacher_pair_cost(teacher, inputs: Inputs, pairs: int, timer: Timer) -> TeacherCost:
    """Time ``teacher.rank_score`` on ``pairs`` (caption, image) pairs per call (caption ``i`` with image
    ``i mod N``: matched and unmatched pairs cost the same)."""
    ids, mask = inputs.ids[:pairs], inputs.mask[:pairs]
    if len(ids) < pairs:
        raise ValueError(f"retrieval_pairs={pairs}: more than the {len(ids)} captions of the sample")
    pixels = inputs.images[torch.arange(pairs, device=inputs.images.device) % len(inputs.images)]
    with torch.inference_mode():
        times = timer(lambda: teacher.rank_score(ids, mask, pixels))
    return TeacherCost(statistics.median(times) / pairs, pairs * len(times))


def dual_unit_costs(student, inputs: Inputs, batch_size: int, timer: Timer) -> DualCost:
    """Time the image tower on ``batch_size`` images and the text tower on ``batch_size`` captions."""
    images, ids, mask = inputs.images[:batch_size], inputs.ids[:batch_size], inputs.mask[:batch_size]
    with torch.inference_mode():
        image_s = statistics.median(timer(lambda: student.encode_image(images).cls)) / len(images)
        caption_s = statistics.median(timer(lambda: student.encode_text(ids, mask).cls)) / len(ids)
    return DualCost(image_s, caption_s)


def matrix_seconds(student, n: int, timer: Timer) -> float:
    """Median seconds of ``itc_logits`` on ``5n`` caption and ``n`` image vectors (projections, normalisation, the
    ``(5n, n)`` product)."""
    dim, device = student.config.hidden_size, student.logit_scale.device
    texts = torch.randn(CAPTIONS_PER_IMAGE * n, dim, device=device)
    images = torch.randn(n, dim, device=device)
    with torch.inference_mode():
        return statistics.median(timer(lambda: student.itc_logits(texts, images)))


def extrapolate_teacher_s(n: int, cost: TeacherCost) -> float:
    """``5N² · per_pair_s``: one joint pass per (caption, image) pair."""
    return CAPTIONS_PER_IMAGE * n * n * cost.per_pair_s


def extrapolate_dual_s(n: int, cost: DualCost, matrix_s: float) -> float:
    """``N · per_image_s + 5N · per_caption_s + matrix_s``."""
    return n * cost.per_image_s + CAPTIONS_PER_IMAGE * n * cost.per_caption_s + matrix_s


def scaling_row(n: int, teacher: TeacherCost, dual_s: float, dual_measured: str, **extra) -> dict:
    """One ``retrieval.json`` row: gallery size, dual and teacher seconds, how each was obtained, the speed-up."""
    teacher_s = extrapolate_teacher_s(n, teacher)
    return {"images": n, "captions": CAPTIONS_PER_IMAGE * n, "pairs": CAPTIONS_PER_IMAGE * n * n,
            "dual_s": round(dual_s, 6), "dual_measured": dual_measured,
            "teacher_s": round(teacher_s, 6), "teacher_extrapolated": True,
            "teacher_per_pair_ms": round(1000 * teacher.per_pair_s, 6),
            "teacher_pairs_sampled": teacher.pairs_sampled,
            "speedup": round(teacher_s / dual_s, 3), **extra}


def scaling_end_to_end(teacher, student, sizes: list[int], inputs: Inputs, batch_size: int, pairs: int,
                       timer: Timer) -> dict[str, dict]:
    """``{"<N>": row}`` with the dual encoder timed end to end on each gallery (:func:`dual_scores`) and the
    teacher extrapolated from a sample of pairs. ``inputs`` holds the largest gallery."""
    teacher_cost = teacher_pair_cost(teacher, inputs, pairs, timer)
    rows = {}
    for n in sizes:
        gallery = inputs.first(n)
        with torch.inference_mode():
            dual_s = statistics.median(timer(lambda: dual_scores(student, gallery, batch_size)))
        rows[str(n)] = scaling_row(n, teacher_cost, dual_s, "end_to_end")
    return rows


def scaling_extrapolated(teacher, student, sizes: list[int], inputs: Inputs, batch_size: int, pairs: int,
                         timer: Timer) -> dict[str, dict]:
    """``{"<N>": row}`` with both models extrapolated from measured unit costs (the matrix timed at each N);
    ``inputs`` needs ``max(batch_size, pairs)`` captions and ``batch_size`` images only."""
    teacher_cost = teacher_pair_cost(teacher, inputs, pairs, timer)
    dual_cost = dual_unit_costs(student, inputs, batch_size, timer)
    rows = {}
    for n in sizes:
        matrix_s = matrix_seconds(student, n, timer)
        rows[str(n)] = scaling_row(n, teacher_cost, extrapolate_dual_s(n, dual_cost, matrix_s), "extrapolated",
                                   dual_per_image_ms=round(1000 * dual_cost.per_image_s, 6),
                                   dual_per_caption_ms=round(1000 * dual_cost.per_caption_s, 6),
                                   dual_matrix_s=round(matrix_s, 6))
    return rows
