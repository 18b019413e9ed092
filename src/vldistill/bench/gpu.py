"""Cost of one paper-size distillation training step, and its model-FLOPs utilisation (MFU).

One step of ``distill_finetune`` on a task, as the pipeline computes it (read-only use of
:mod:`vldistill.train.objectives`): the frozen teacher's targets (logits + last-layer Q/K, no gradients), the dual
student's forward with Q/K hooks, the DiDE loss (``distill.knowledge``, default gt + soft + attn_cross), backward,
an AdamW step. Models at ``bench.paper.architecture`` (ViLT-B/32) with random weights, synthetic batch.

``MFU = (FLOPs of one step / step seconds) / peak FLOP/s``, FLOPs counted by ``torch.utils.flop_counter`` on one
step (forward + backward of both models; the optimizer's elementwise work is not counted).

Not part of the pipeline (``dvc.yaml`` does not run it). On a GPU::

    python -m vldistill.bench.gpu --params params.paper.yaml --task nlvr2 --batch-size 32   # metrics/bench/gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch

from vldistill.bench.paper import describe, num_outputs, paper_models, synthetic_batch
from vldistill.bench.timing import count_flops, time_calls
from vldistill.config import DistillParams, PaperArchitecture, PaperBenchParams, load_or_exit
from vldistill.distill.knowledge import KnowledgeModules
from vldistill.io import write_json
from vldistill.train import objectives

GPU = Path("metrics/bench/gpu.json")
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100": 756.0, "A100": 312.0,
                    "L40S": 362.1, "A10": 125.0}
"""Dense bf16 tensor-core peaks (vendor data sheets, TFLOP/s) by device-name fragment, first match wins; pass
``--peak-tflops`` for any other device or precision (an unlisted H100 variant counts as the PCIe card's)."""


def _sig(x: float, digits: int = 5) -> float:
    """``x`` rounded to ``digits`` significant digits (tiny test models do a few MFLOP per step)."""
    return float(f"{x:.{digits}g}")


def peak_tflops(device_name: str) -> float | None:
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return peak
    return None


def training_batch(task: str, size: int, arch: PaperArchitecture, device: str,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic batch with the task's labels: ``labels (B,)`` (nlvr2, snli_ve) or VQA's soft scores
    ``targets (B, A)``."""
    batch = synthetic_batch(task, size, arch.text_len, arch.vocab_size, arch.image_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if task == "vqa":
        batch["targets"] = (torch.rand(size, arch.vqa_answers, generator=generator) > 0.999).float()
    else:
        batch["labels"] = torch.randint(0, num_outputs(task, arch), (size,), generator=generator)
    return {k: v.to(device) for k, v in batch.items()}


def distill_step(task: str, arch: PaperArchitecture, recipe: DistillParams, batch_size: int, device: str,
                 precision: str = "32"):
    """``step()``: one training step on a fixed synthetic batch of ``batch_size`` examples, returning the loss;
    ``precision`` ``"bf16"`` runs the forward under ``torch.autocast`` (the pipeline's ``bf16-mixed``)."""
    if task not in ("nlvr2", "snli_ve", "vqa"):
        raise ValueError(f"task {task!r}: the training step is timed on nlvr2, snli_ve or vqa")
    teacher, student = paper_models(task, arch)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    pairs = objectives.distill_pairs(recipe, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    teacher_layers = sorted({t for _, t in pairs})
    views = objectives.needs_views(recipe.knowledge)
    extras = KnowledgeModules(set(recipe.knowledge), pairs, student.config.hidden_size, teacher.config.hidden_size,
                              recipe.nce.queue_size, recipe.nce.temperature).to(device)
    teacher_fn = lambda b: objectives.teacher_targets(teacher, b, teacher_layers, views)  # noqa: E731
    loss_fn = objectives.dide_loss(recipe, pairs, teacher_fn, extras)
    optimizer = torch.optim.AdamW([*student.parameters(), *extras.parameters()], lr=1e-4)
    batch = training_batch(task, batch_size, arch, device)
    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> torch.Tensor:
        with autocast():
            loss = loss_fn(student, batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_distill_step(task: str, knobs: PaperBenchParams, recipe: DistillParams, batch_size: int, device: str,
                      precision: str = "32", peak: float | None = None) -> dict:
    """Median step time over ``knobs`` repeats (warm-up ``knobs.warmup`` steps), per example, FLOPs per step and
    MFU against ``peak`` TFLOP/s (``None``: looked up from the device name for bf16 on CUDA, else no MFU)."""
    arch = knobs.architecture
    step = distill_step(task, arch, recipe, batch_size, device, precision)
    flops = count_flops(step)  # one real step, also a warm-up
    times = time_calls(step, knobs, device)
    step_s = statistics.median(times)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if peak is None and device == "cuda" and precision == "bf16":
        peak = peak_tflops(name)
    achieved = flops / step_s / 1e12
    return {"device": {"kind": device, "name": name, "torch": torch.__version__},
            "task": task, "batch_size": batch_size, "precision": precision, "knowledge": list(recipe.knowledge),
            "step_ms": _sig(1000 * step_s), "step_ms_mean": _sig(1000 * statistics.fmean(times)),
            "repeats": len(times), "ms_per_example": _sig(1000 * step_s / batch_size),
            "tflop_per_step": _sig(flops / 1e12), "achieved_tflops": _sig(achieved),
            "peak_tflops": peak, "mfu": _sig(achieved / peak) if peak else None,
            "architecture": describe(arch)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="bench.paper.* (architecture, repeats) and distill.*")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--task", default="nlvr2", choices=["nlvr2", "snli_ve", "vqa"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, choices=["32", "bf16"], help="default: bf16 on cuda, else 32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device, 1e12")
    parser.add_argument("--out", default=str(GPU))
    args = parser.parse_args(argv)
    params = load_or_exit(args.params, args.set)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: no CUDA device is visible\n")
    precision = args.precision or ("bf16" if args.device == "cuda" else "32")
    torch.set_num_threads(params.bench.paper.threads)
    result = time_distill_step(args.task, params.bench.paper, params.distill, args.batch_size, args.device, precision,
                               args.peak_tflops)
    write_json(args.out, result)
    print(f"{result['device']['name']}: {args.task} batch {args.batch_size} {precision}: "
          f"{result['step_ms']:.1f} ms/step, "
          f"{result['ms_per_example']:.2f} ms/example, {result['achieved_tflops']:.1f} TFLOP/s, MFU {result['mfu']}")
    return result


if __name__ == "__main__":
    main()
