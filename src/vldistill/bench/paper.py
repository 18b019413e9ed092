"""Models and inputs at the paper's size (ViLT-B/32 and its dual encoder), with random weights.

Built through the same classes as the pipeline's models (:class:`ViltTeacher` from :func:`vilt_config`,
:class:`DualEncoder.from_teacher`), so what is timed is the code that is trained; the weights are random because
latency does not depend on them. Inputs are synthetic: ``text_len`` real text tokens (no padding) and images of
``image_size = [H, W]`` (ViLT-B/32 at 384×640: 1 + 12·20 = 241 image tokens).
"""

from __future__ import annotations

import torch

from vldistill.config import PaperArchitecture, TeacherParams
from vldistill.models.dual import DualEncoder
from vldistill.models.teacher import ViltTeacher, vilt_config

NUM_OUTPUTS = {"nlvr2": 2, "snli_ve": 3, "retrieval": 1}
"""Task head widths; VQA's is ``PaperArchitecture.vqa_answers``."""


def num_outputs(task: str, arch: PaperArchitecture) -> int:
    return arch.vqa_answers if task == "vqa" else NUM_OUTPUTS[task]


def image_tokens(image_size: tuple[int, int] | list[int], patch_size: int) -> int:
    """``1 + (H/P)·(W/P)``: ViLT's [CLS] plus one token per patch (every patch kept)."""
    return 1 + (image_size[0] // patch_size) * (image_size[1] // patch_size)


def teacher_params(arch: PaperArchitecture) -> TeacherParams:
    """The ``teacher.*`` knobs of this architecture (what ``params.paper.yaml`` sets), for :func:`vilt_config`."""
    return TeacherParams(hidden_size=arch.hidden_size, num_layers=arch.num_layers, num_heads=arch.num_heads,
                         intermediate_size=arch.intermediate_size, patch_size=arch.patch_size,
                         max_text_len=arch.text_len, pixel_norm="vilt")


def paper_models(task: str, arch: PaperArchitecture, seed: int = 0) -> tuple[ViltTeacher, DualEncoder]:
    """``(teacher, student)`` for ``task`` in eval mode on CPU: the teacher with the task's head (``classifier``,
    or ``rank_output`` for retrieval), the dual encoder with both towers copied from it and the task's head."""
    config = vilt_config(teacher_params(arch), image_size=arch.image_size[0], vocab_size=arch.vocab_size)
    config.num_labels = num_outputs(task, arch)
    torch.manual_seed(seed)
    teacher = ViltTeacher(config, heads=(task,)).eval()
    student = DualEncoder.from_teacher(teacher, arch.fusion_hidden, task=task, num_outputs=num_outputs(task, arch))
    return teacher, student.eval()


def synthetic_texts(n: int, text_len: int, vocab_size: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids (n, T), attention_mask (n, T))``: random word ids, every position a real token."""
    low = min(1000, vocab_size // 2)  # above BERT's special and unused ids when the vocabulary is large enough
    ids = torch.randint(low, vocab_size, (n, text_len), generator=generator)
    return ids, torch.ones(n, text_len, dtype=torch.long)


def synthetic_images(n: int, image_size: tuple[int, int] | list[int], generator: torch.Generator) -> torch.Tensor:
    """``(n, 3, H, W)`` normalised pixels."""
    return torch.randn(n, 3, *image_size, generator=generator)


def synthetic_batch(task: str, size: int, text_len: int, vocab_size: int, image_size: tuple[int, int] | list[int],
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch shaped as the task's collated batches: ``input_ids``, ``attention_mask`` ``(B, T)`` and
    ``pixel_values`` ``(B, 3, H, W)``, or NLVR2's ``pixel_values_left`` / ``pixel_values_right``."""
    generator = torch.Generator().manual_seed(seed)
    ids, mask = synthetic_texts(size, text_len, vocab_size, generator)
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "nlvr2":
        batch["pixel_values_left"] = synthetic_images(size, image_size, generator)
        batch["pixel_values_right"] = synthetic_images(size, image_size, generator)
    else:
        batch["pixel_values"] = synthetic_images(size, image_size, generator)
    return batch


def describe(arch: PaperArchitecture) -> dict:
    """The architecture as recorded in the benchmark files (with the derived token counts)."""
    return {**arch.model_dump(), "image_tokens": image_tokens(arch.image_size, arch.patch_size),
            "weights": "random"}
