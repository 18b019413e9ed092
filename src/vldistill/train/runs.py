"""One function per training stage: build the model, the data and the objective, run :func:`fit`, save outputs.

Stage entry points call these with the validated :class:`~vldistill.config.Params`; nothing here reads params.yaml.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from functools import partial
from pathlib import Path

import torch

from vldistill import paths
from vldistill.config import Params, flatten
from vldistill.data import tokenizer as tok
from vldistill.data.augment import augment_images
from vldistill.data.datasets import load_split
from vldistill.data.prepared import read_answers
from vldistill.evaluate import sharding
from vldistill.evaluate.metrics import retrieval_scores, split_batches, task_metrics
from vldistill.io import atomic_dir, write_json
from vldistill.paths import replica_name
from vldistill.models.dual import DualEncoder
from vldistill.models.fusion import fusion_student
from vldistill.models.teacher import ViltTeacher, vilt_config
from vldistill.train import objectives, tasks
from vldistill.train.loop import clear_checkpoints, fit, make_fabric, write_curve
from vldistill.train.tracking import Tracker


def fingerprint(*parts) -> str:
    """Hash of a stage's inputs (params and the files it starts from) that guards checkpoint resumption."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            for f in sorted(part.rglob("*")) if part.is_dir() else [part]:
                if f.is_file():
                    h.update(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _augment(params: Params, stage: str):
    """``train.augment`` for ``stage``'s training loader (:func:`augment_images`), or ``None`` when it is off there."""
    augment = params.train.augment
    if not augment.randaugment or stage not in augment.stages:
        return None
    return partial(augment_images, params=augment, stage=stage)


def _split(params: Params, task: str, split: str, tokenizer):
    return load_split(paths.PREPARED, task, split, tokenizer, params.teacher.max_text_len, params.teacher.pixel_norm,
                      params.data.loader)


def _finish(fabric, model, result, out_dir: Path, metrics_path: Path, ckpt_dir: Path, extra: dict, tracker: Tracker,
            curve: Path, keep_checkpoint: bool = False) -> dict:
    """Save the best-on-dev model, write the stage's metrics file, log both, drop the resume checkpoints (unless
    ``keep_checkpoint``: a replica's stay until the stage's last replica is saved, as DVC removes the stage's
    outputs before a rerun)."""
    summary = {"best_epoch": result.best_epoch, "steps": result.steps,
               **{f"dev_{k}": round(v, 6) for k, v in result.best_dev.items()}, **extra}
    if fabric.is_global_zero:
        model.load_state_dict(result.best_state)
        with atomic_dir(out_dir) as tmp:
            model.save(tmp)
        write_json(metrics_path, summary)
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.log_artifact(metrics_path)
        tracker.log_artifact(curve)
    if not keep_checkpoint:
        clear_checkpoints(fabric, ckpt_dir)
    return summary


# ---------------------------------------------------------------------------------------------- teacher
def loaded_teacher(model: ViltTeacher, source: str, stage: str, task: str, extra: dict | None = None,
                   write: bool = True) -> dict:
    """Save a teacher loaded from a checkpoint (``teacher.init`` / ``teacher.finetuned``) as this stage's output,
    with a metrics file that says where it came from (no training: 0 steps); ``write=False`` (a process other than
    rank 0) only returns that summary."""
    out, metrics = paths.model_dir(stage, None if task == "pretrain" else task), paths.train_metrics(stage, task)
    summary = {"loaded_from": source, "steps": 0, **(extra or {})}
    if not write:
        return summary
    with Tracker(stage, {"teacher.source": source}, task=task) as tracker:
        with atomic_dir(out) as tmp:
            model.save(tmp)
        write_json(metrics, summary)
        tracker.log_artifact(metrics)
    return summary


def teacher_pretrain(params: Params) -> dict:
    """ViLT from scratch on the pre-training corpus: MLM + ITM; dev metric = ITM accuracy on matched/rolled pairs.
    With ``teacher.init`` naming a hub id or a local checkpoint, that checkpoint is loaded instead (no training)."""
    if params.teacher.init != "scratch":
        from vldistill.models.hub import load_init_teacher

        return loaded_teacher(load_init_teacher(params.teacher.init, ("mlm", "itm"), params=params.teacher),
                              params.teacher.init, "teacher_pretrain", "pretrain")
    stage, budget = "teacher_pretrain", params.train.teacher_pretrain
    fabric = make_fabric(params.fabric, params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    train, dev = _split(params, "pretrain", "train", tokenizer), _split(params, "pretrain", "dev", tokenizer)
    # ViLT's image_size: the shorter side of the pre-training images (384 at paper scale); the position embeddings of
    # that square grid are resized to each image's patch grid (models.teacher.patch_tokens)
    config = vilt_config(params.teacher, min(train.images.shape[1:3]), len(tokenizer))
    model = ViltTeacher(config, heads=("mlm", "itm"), tie_mlm_decoder=params.teacher.tie_mlm_decoder)
    special = [tokenizer.convert_tokens_to_ids(t) for t in tok.SPECIAL]
    objective = objectives.Objective(model, objectives.teacher_pretrain_loss(tokenizer.mask_token_id, len(tokenizer), special))

    def evaluate(obj) -> dict[str, float]:
        """Mean MLM and ITM losses over dev; each process takes its block of the dev batches, sums are all-reduced
        (under DDP a process's masks and negatives are its own stream's, so the losses are those of one process in
        expectation, not bit for bit)."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(params.seed)  # the same masks and negatives at every evaluation
        sums, n = {"mlm": 0.0, "itm": 0.0}, 0
        batches, kept = split_batches(dev, 256, fabric)
        module = getattr(obj, "module", obj)  # not DDP's forward: processes may run different numbers of batches
        with torch.no_grad():
            for batch in itertools.islice(batches, kept):
                with fabric.autocast():
                    terms = module(batch)
                sums = {k: sums[k] + float(terms[k]) * len(batch["index"]) for k in sums}
                n += len(batch["index"])
        torch.random.set_rng_state(gen_state)
        if fabric.world_size > 1:
            total = fabric.all_reduce(torch.tensor([sums["mlm"], sums["itm"], n], dtype=torch.float64,
                                                   device=fabric.device), reduce_op="sum").tolist()
            sums, n = {"mlm": total[0], "itm": total[1]}, total[2]
        return {"neg_loss": -(sums["mlm"] + sums["itm"]) / n, "mlm_loss": sums["mlm"] / n, "itm_loss": sums["itm"] / n}

    ckpt, curve = paths.checkpoint_dir(stage), paths.curve_path(stage, "pretrain")
    with Tracker(stage, flatten({"seed": params.seed, "teacher": params.teacher, f"train.{stage}": budget}),
                 task="pretrain", enabled=fabric.is_global_zero) as tracker:
        start = time.perf_counter()
        result = fit(fabric, objective, train.loader(budget.batch_size, True, params.seed, drop_last=True),
                     lambda m: evaluate(m), budget, "neg_loss", ckpt, curve,
                     fingerprint(params.teacher.model_dump(), budget.model_dump(), params.seed, paths.TOKENIZER,
                                 paths.PREPARED / "pretrain"),
                     params.seed, tracker, head_prefixes=("model.mlm_score", "model.itm_score"),
                     seed_per_batch=params.fabric.seed_per_batch)
        result.best_state = _strip(result.best_state)
        tracker.log_metrics({"wall_seconds": time.perf_counter() - start})
        return _finish(fabric, model, result, paths.model_dir(stage), paths.train_metrics(stage, "pretrain"), ckpt,
                       {}, tracker, curve)


def _strip(state: dict) -> dict:
    """State dict of an :class:`Objective` → that of its ``model`` (the loss's ``extras`` are not saved)."""
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def rank_head_from_itm(model: ViltTeacher, itm_score: torch.nn.Linear) -> None:
    """Start the retrieval head ``rank_output`` from the ITM head's "matched" row, as ViLT's IRTR fine-tuning does."""
    with torch.no_grad():
        model.rank_output.weight.copy_(itm_score.weight[1:])
        model.rank_output.bias.copy_(itm_score.bias[1:])


def teacher_finetune(params: Params, task: str) -> dict:
    """Fine-tune the pre-trained teacher on ``task`` (heads and losses in :mod:`vldistill.train.tasks`); the checkpoint
    kept is the best on dev by the task's metric."""
    stage, budget = "teacher_finetune", params.budget("teacher_finetune", task)
    tokenizer = tok.load(paths.TOKENIZER)
    if task in params.teacher.finetuned:  # a released fine-tuned checkpoint is this task's teacher
        from vldistill.models.hub import load_finetuned_teacher

        # the dev metric runs on the device, sharded over the processes; seeded first, so that every process draws
        # the same fresh VQA rows for answers the checkpoint lacks
        fabric = make_fabric(params.fabric, params.seed)
        model = load_finetuned_teacher(params.teacher, task)
        if task == "vqa":
            remap_vqa_head(model, read_answers(paths.PREPARED, "vqa"))
        dev = _split(params, task, "dev", tokenizer)
        dev_metrics = task_metrics(sharding.place(model, fabric, keep=True).eval(), dev, task, fabric=fabric)
        summary = loaded_teacher(model.eval(), params.teacher.finetuned[task], stage, task,
                                 {f"dev_{k}": round(v, 6) for k, v in dev_metrics.items()}, write=fabric.is_global_zero)
        fabric.barrier()
        return summary
    fabric = make_fabric(params.fabric, params.seed)
    train, dev = _split(params, task, "train", tokenizer), _split(params, task, "dev", tokenizer)
    pretrained = paths.model_dir("teacher_pretrain")
    model = ViltTeacher.load(pretrained, heads=(task,), num_labels=tasks.num_outputs(task, paths.PREPARED))
    if task == "retrieval":
        rank_head_from_itm(model, ViltTeacher.load(pretrained).itm_score)
    negatives = params.train.retrieval_negatives
    objective = objectives.Objective(model, objectives.teacher_task_loss(task, negatives))
    ckpt, curve = paths.checkpoint_dir(stage, task), paths.curve_path(stage, task)
    with Tracker(stage, flatten({"seed": params.seed, f"train.{stage}": budget, "train.augment": params.train.augment}),
                 task=task, enabled=fabric.is_global_zero) as tracker:
        loader = train.loader(budget.batch_size, True, params.seed, drop_last=True, augment=_augment(params, stage))
        result = fit(fabric, objective, loader, _dev_metrics(task, dev, fabric), budget, tasks.METRIC[task], ckpt, curve,
                     fingerprint(budget.model_dump(), params.seed, negatives, pretrained, paths.PREPARED / task,
                                 params.train.augment.model_dump()),
                     params.seed, tracker, head_prefixes=("model.classifier", "model.rank_output"),
                     seed_per_batch=params.fabric.seed_per_batch)
        result.best_state = _strip(result.best_state)
        return _finish(fabric, model, result, paths.model_dir(stage, task), paths.train_metrics(stage, task), ckpt,
                       {}, tracker, curve)


def remap_vqa_head(model: ViltTeacher, answers: list[str]) -> None:
    """Reorder a loaded VQA head's output rows to the prepared answer vocabulary ``answers`` (the checkpoint's
    ``config.id2label`` names its rows); answers the checkpoint lacks get freshly initialised rows."""
    out = model.classifier[-1]
    known = {label: int(i) for i, label in model.config.id2label.items()}
    fresh = torch.nn.Linear(out.in_features, len(answers))
    with torch.no_grad():
        for row, answer in enumerate(answers):
            if answer in known:
                fresh.weight[row] = out.weight[known[answer]]
                fresh.bias[row] = out.bias[known[answer]]
    model.classifier[-1] = fresh
    model.config.num_labels = len(answers)
    missing = [a for a in answers if a not in known]
    if missing:
        print(f"teacher_finetune@vqa: {len(missing)} of {len(answers)} answers are not in the checkpoint's "
              f"vocabulary (new rows): {missing[:5]}")


DEV_CAPTIONS_PER_IMAGE = 1
"""Retrieval dev metric during training: one caption per image (a fusion model scores every pair, N² passes)."""


def _dev_metrics(task: str, dev, fabric):
    """``evaluate_fn`` of :func:`fit`: the task's metrics on dev for the model inside the :class:`Objective`."""
    return lambda objective: task_metrics(objective.model, dev, task, fabric=fabric,
                                          captions_per_image=DEV_CAPTIONS_PER_IMAGE)


# ------------------------------------------------------------------------------------------------ student
def distill_pretrain(params: Params) -> dict:
    """DiDE pre-training distillation: student from the pre-trained teacher; ITC + MLM (ground truth) + ITM on
    image–caption pairs with the teacher's ITM soft labels and cross-modal attention on matched pairs (per
    ``distill.knowledge``), see :func:`objectives.dual_pretrain_loss`."""
    stage, budget, recipe = "distill_pretrain", params.train.distill_pretrain, params.distill
    fabric = make_fabric(params.fabric, params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    train, dev = _split(params, "pretrain", "train", tokenizer), _split(params, "pretrain", "dev", tokenizer)
    teacher = ViltTeacher.load(paths.model_dir("teacher_pretrain")).eval().requires_grad_(False)
    teacher = fabric.to_device(teacher)
    student = DualEncoder.from_teacher(teacher, params.student.fusion_hidden, task="pretrain")
    special = [tokenizer.convert_tokens_to_ids(t) for t in tok.SPECIAL]
    masker = lambda ids, mask: objectives.mask_tokens(ids, mask, tokenizer.mask_token_id, len(tokenizer),  # noqa: E731
                                                      special)
    objective = objectives.distill_pretrain_objective(recipe, student, teacher, masker)

    def evaluate(obj) -> dict[str, float]:
        """Caption→image and image→caption recall over the dev images (one caption per image), from ITC."""
        return retrieval_scores(obj.model, dev, captions_per_image=1, fabric=fabric).recall()

    ckpt, curve = paths.checkpoint_dir(stage), paths.curve_path(stage, "pretrain")
    with Tracker(stage, flatten({"seed": params.seed, "distill": recipe, "student": params.student,
                                 f"train.{stage}": budget}), task="pretrain", enabled=fabric.is_global_zero) as tracker:
        result = fit(fabric, objective, train.loader(budget.batch_size, True, params.seed, drop_last=True), evaluate,
                     budget, "r_mean", ckpt, curve,
                     fingerprint(recipe.model_dump(), params.student.model_dump(), budget.model_dump(), params.seed,
                                 paths.model_dir("teacher_pretrain"), paths.PREPARED / "pretrain"),
                     params.seed, tracker, head_prefixes=("model.fusion", "model.itm_score", "model.text_proj",
                                                          "model.image_proj"),
                     seed_per_batch=params.fabric.seed_per_batch)
        result.best_state = _strip(result.best_state)
        return _finish(fabric, student, result, paths.model_dir(stage), paths.train_metrics(stage, "pretrain"), ckpt,
                       {}, tracker, curve)


def _finetune_student(params: Params, variant: str, task: str):
    """The student a fine-tuning distillation starts from.

    Dual: from ``distill_pretrain`` when 'pretrain' is in the variant's stages, else both towers from the pre-trained
    teacher; a fresh task head. Fusion: a smaller ViLT from the pre-trained teacher (see
    :func:`vldistill.models.fusion.fusion_student`; retrieval's rank head from the teacher's ITM head).
    """
    outputs = tasks.num_outputs(task, paths.PREPARED)
    if params.student_kind(variant) == "dual" and "pretrain" in params.variant(variant).stages:
        return DualEncoder.load(paths.model_dir("distill_pretrain")).with_task(task, outputs)
    pretrained = ViltTeacher.load(paths.model_dir("teacher_pretrain"))
    if params.student_kind(variant) == "fusion":
        pretrained.config.num_labels = outputs
        student = fusion_student(pretrained, params.student, heads=(task,))
        if task == "retrieval":
            rank_head_from_itm(student, pretrained.itm_score)
        return student
    return DualEncoder.from_teacher(pretrained, params.student.fusion_hidden, task=task, num_outputs=outputs)


def _teacher_fn(recipe, teacher: ViltTeacher, train, teacher_layers: list[int], device):
    """The teacher's targets per batch: ``None`` (ground truth only), a cache over the train split (exact: frozen
    teacher, unaugmented inputs, knowledge within :data:`objectives.CACHEABLE`), or computed live."""
    views = objectives.needs_views(recipe.knowledge)
    if set(recipe.knowledge) == {"gt"}:
        return None
    if recipe.cache_teacher and set(recipe.knowledge) <= objectives.CACHEABLE:
        return objectives.cache_teacher_targets(teacher, train, teacher_layers, views, 256, device)
    return lambda batch: objectives.teacher_targets(teacher, batch, teacher_layers, views)


def distill_finetune(params: Params, task: str, variant: str) -> dict:
    """Fine-tuning distillation of one named variant on ``task``, one replica per seed of ``seeds`` (model
    ``<variant>_seed<k>`` in ``models/distill_finetune/<task>/<variant>/seed<k>``): student from ``distill_pretrain``
    when 'pretrain' is in the recipe's stages (else from the pre-trained teacher), knowledge from the fine-tuned
    teacher of ``task``, the checkpoint kept the best on dev. The replicas share one process, the loaded splits and
    the teacher's cached targets; each has its own resume checkpoint until the last one is done."""
    stage, recipe = "distill_finetune", params.variant(variant)
    fabric = make_fabric(params.fabric, params.lead_seed)
    tokenizer = tok.load(paths.TOKENIZER)
    train, dev = _split(params, task, "train", tokenizer), _split(params, task, "dev", tokenizer)
    teacher = ViltTeacher.load(paths.model_dir("teacher_finetune", task)).eval().requires_grad_(False)
    teacher = fabric.to_device(teacher)
    cached: dict[tuple[int, ...], object] = {}

    def targets_for(layers: list[int]):
        """The teacher's targets for ``layers``: computed (or cached) once, shared by every seed's replica."""
        if tuple(layers) not in cached:
            cached[tuple(layers)] = _teacher_fn(recipe, teacher, train, layers, fabric.device)
        return cached[tuple(layers)]

    summaries = {replica_name(variant, seed): _distill_replica(params, task, variant, seed, fabric, train, dev,
                                                               teacher, targets_for)
                 for seed in params.seeds}
    clear_checkpoints(fabric, paths.checkpoint_dir(stage, task, variant))
    return summaries


def _distill_replica(params: Params, task: str, variant: str, seed: int, fabric, train, dev, teacher,
                     targets_for) -> dict:
    """One seed's student of :func:`distill_finetune`: seeded before the student's new weights are drawn."""
    stage, budget, recipe = "distill_finetune", params.budget("distill_finetune", task), params.variant(variant)
    fabric.seed_everything(seed, workers=True, verbose=False)
    student = _finetune_student(params, variant, task)
    negatives = params.train.retrieval_negatives
    objective = objectives.distill_finetune_objective(recipe, task, student, teacher, negatives, targets_for)
    ckpt = paths.checkpoint_dir(stage, task, variant) / f"seed{seed}"
    curve = paths.replica_curve(task, variant, seed)
    with Tracker(stage, flatten({"seed": seed, "distill": recipe, "student": params.student,
                                 "student_kind": params.student_kind(variant), f"train.{stage}": budget,
                                 "train.augment": params.train.augment}),
                 task=task, variant=replica_name(variant, seed), enabled=fabric.is_global_zero) as tracker:
        result = fit(fabric, objective,
                     train.loader(budget.batch_size, True, seed, drop_last=True, augment=_augment(params, stage)),
                     _dev_metrics(task, dev, fabric), budget, tasks.METRIC[task], ckpt, curve,
                     fingerprint(recipe.model_dump(), params.student.model_dump(), params.student_kind(variant),
                                 budget.model_dump(), seed, negatives, paths.model_dir("teacher_finetune", task),
                                 paths.model_dir("distill_pretrain"), paths.PREPARED / task,
                                 params.train.augment.model_dump()),
                     seed, tracker, head_prefixes=("model.fusion", "model.classifier", "model.rank_output", "extras"),
                     seed_per_batch=params.fabric.seed_per_batch)
        result.best_state = _strip(result.best_state)
        if fabric.is_global_zero and not curve.is_file():  # resumed from a finished replica's checkpoint
            write_curve(curve, result.history)
        return _finish(fabric, student, result, paths.replica_dir(task, variant, seed),
                       paths.replica_metrics(task, variant, seed), ckpt,
                       {"knowledge": "+".join(recipe.knowledge), "student": params.student_kind(variant),
                        "seed": seed}, tracker, curve, keep_checkpoint=True)
