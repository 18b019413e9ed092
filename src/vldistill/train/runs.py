"""One function per training stage: build the model, the data and the objective, run :func:`fit`, save outputs.

Stage entry points call these with the validated :class:`~vldistill.config.Params`; nothing here reads params.yaml.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from vldistill import paths
from vldistill.config import Params, flatten
from vldistill.data import tokenizer as tok
from vldistill.data.datasets import load_split
from vldistill.evaluate.metrics import nlvr2_accuracy
from vldistill.io import write_json
from vldistill.distill.knowledge import KnowledgeModules
from vldistill.models.dual import DualEncoder
from vldistill.models.fusion import fusion_student
from vldistill.models.teacher import ViltTeacher, vilt_config
from vldistill.train import objectives
from vldistill.train.loop import clear_checkpoints, fit, make_fabric
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


def _image_size(params: Params) -> int:
    return params.data.scene.grid * params.data.scene.cell


def _split(params: Params, task: str, split: str, tokenizer):
    return load_split(paths.PREPARED, task, split, tokenizer, params.teacher.max_text_len, params.teacher.pixel_norm)


def _finish(fabric, model, result, out_dir: Path, metrics_path: Path, ckpt_dir: Path, extra: dict, tracker: Tracker,
            curve: Path) -> dict:
    """Save the best-on-dev model, write the stage's metrics file, log both, drop the resume checkpoints."""
    summary = {"best_epoch": result.best_epoch, "steps": result.steps,
               **{f"dev_{k}": round(v, 6) for k, v in result.best_dev.items()}, **extra}
    if fabric.is_global_zero:
        model.load_state_dict(result.best_state)
        model.save(out_dir)
        write_json(metrics_path, summary)
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        tracker.log_artifact(metrics_path)
        tracker.log_artifact(curve)
    clear_checkpoints(fabric, ckpt_dir)
    return summary


# ---------------------------------------------------------------------------------------------- teacher
def teacher_pretrain(params: Params) -> dict:
    """ViLT from scratch on the pre-training corpus: MLM + ITM; dev metric = ITM accuracy on matched/rolled pairs."""
    stage, budget = "teacher_pretrain", params.train.teacher_pretrain
    fabric = make_fabric(params.fabric, params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    train, dev = _split(params, "pretrain", "train", tokenizer), _split(params, "pretrain", "dev", tokenizer)
    config = vilt_config(params.teacher, _image_size(params), len(tokenizer))
    model = ViltTeacher(config, heads=("mlm", "itm"), tie_mlm_decoder=params.teacher.tie_mlm_decoder)
    special = [tokenizer.convert_tokens_to_ids(t) for t in tok.SPECIAL]
    objective = objectives.Objective(model, objectives.teacher_pretrain_loss(tokenizer.mask_token_id, len(tokenizer), special))

    def evaluate(obj) -> dict[str, float]:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(params.seed)  # the same masks and negatives at every evaluation
        sums, n = {"mlm": 0.0, "itm": 0.0}, 0
        with torch.no_grad():
            for batch in dev.loader(256, shuffle=False, seed=0):
                batch = {k: v.to(fabric.device) for k, v in batch.items()}
                terms = obj(batch)
                sums = {k: sums[k] + float(terms[k]) * len(batch["index"]) for k in sums}
                n += len(batch["index"])
        torch.random.set_rng_state(gen_state)
        return {"neg_loss": -(sums["mlm"] + sums["itm"]) / n, "mlm_loss": sums["mlm"] / n, "itm_loss": sums["itm"] / n}

    ckpt, curve = paths.checkpoint_dir(stage), paths.curve_path(stage, "pretrain")
    with Tracker(stage, flatten({"seed": params.seed, "teacher": params.teacher, f"train.{stage}": budget}),
                 task="pretrain", enabled=fabric.is_global_zero) as tracker:
        start = time.perf_counter()
        result = fit(fabric, objective, train.loader(budget.batch_size, True, params.seed, drop_last=True),
                     lambda m: evaluate(m), budget, "neg_loss", ckpt, curve,
                     fingerprint(params.teacher.model_dump(), budget.model_dump(), params.seed, paths.TOKENIZER,
                                 paths.PREPARED / "pretrain"),
                     params.seed, tracker, head_prefixes=("model.mlm_score", "model.itm_score"))
        result.best_state = _strip(result.best_state)
        tracker.log_metrics({"wall_seconds": time.perf_counter() - start})
        return _finish(fabric, model, result, paths.model_dir(stage), paths.train_metrics(stage, "pretrain"), ckpt,
                       {}, tracker, curve)


def _strip(state: dict) -> dict:
    """State dict of an :class:`Objective` → that of its ``model`` (the loss's ``extras`` are not saved)."""
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def teacher_finetune(params: Params, task: str) -> dict:
    """Fine-tune the pre-trained teacher on ``task`` (nlvr2: two joint passes, pooled outputs concatenated, CE)."""
    if task != "nlvr2":
        raise ValueError(f"teacher_finetune: task {task!r} is not implemented yet (available: nlvr2)")
    stage, budget = "teacher_finetune", params.train.teacher_finetune
    fabric = make_fabric(params.fabric, params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    train, dev = _split(params, task, "train", tokenizer), _split(params, task, "dev", tokenizer)
    model = ViltTeacher.load(paths.model_dir("teacher_pretrain"), heads=("nlvr2",))
    objective = objectives.Objective(model, objectives.nlvr2_gt_loss)
    ckpt, curve = paths.checkpoint_dir(stage, task), paths.curve_path(stage, task)
    with Tracker(stage, flatten({"seed": params.seed, f"train.{stage}": budget}), task=task,
                 enabled=fabric.is_global_zero) as tracker:
        result = fit(fabric, objective, train.loader(budget.batch_size, True, params.seed, drop_last=True),
                     lambda m: {"accuracy": nlvr2_accuracy(m.model, dev, device=fabric.device)}, budget, "accuracy",
                     ckpt, curve, fingerprint(budget.model_dump(), params.seed, paths.model_dir("teacher_pretrain"),
                                              paths.PREPARED / task),
                     params.seed, tracker, head_prefixes=("model.classifier",))
        result.best_state = _strip(result.best_state)
        return _finish(fabric, model, result, paths.model_dir(stage, task), paths.train_metrics(stage, task), ckpt,
                       {}, tracker, curve)


# ------------------------------------------------------------------------------------------------ student
def distill_pretrain(params: Params) -> dict:
    """DiDE pre-training distillation (minimal): student from the pre-trained teacher; ITC + ITM on image–caption
    pairs with the teacher's ITM soft labels and cross-modal attention on matched pairs (per ``distill.knowledge``)."""
    stage, budget, recipe = "distill_pretrain", params.train.distill_pretrain, params.distill
    fabric = make_fabric(params.fabric, params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    train, dev = _split(params, "pretrain", "train", tokenizer), _split(params, "pretrain", "dev", tokenizer)
    teacher = ViltTeacher.load(paths.model_dir("teacher_pretrain")).eval().requires_grad_(False)
    teacher = fabric.to_device(teacher)
    student = DualEncoder.from_teacher(teacher, params.student.fusion_hidden)
    layers = [s for s, _ in objectives.distill_pairs(recipe, teacher.config.num_hidden_layers,
                                                      teacher.config.num_hidden_layers)]
    objective = objectives.Objective(student, objectives.dual_pretrain_loss(recipe, layers, teacher))

    def evaluate(obj) -> dict[str, float]:
        """Text→image R@1 over the dev images (one caption per image), from ITC similarities."""
        s = obj.model
        first = {}
        for i, key in enumerate(dev.columns["image"].tolist()):
            first.setdefault(key, i)
        idx = list(first.values())
        batch = {k: v.to(fabric.device) for k, v in dev.collate(idx).items()}
        with torch.no_grad():
            sims = s.itc_logits(s.encode_text(batch["input_ids"], batch["attention_mask"]).cls,
                                s.encode_image(batch["pixel_values"]).cls)
        return {"itc_r1": float((sims.argmax(dim=1) == torch.arange(len(idx), device=sims.device)).float().mean())}

    ckpt, curve = paths.checkpoint_dir(stage), paths.curve_path(stage, "pretrain")
    with Tracker(stage, flatten({"seed": params.seed, "distill": recipe, "student": params.student,
                                 f"train.{stage}": budget}), task="pretrain", enabled=fabric.is_global_zero) as tracker:
        result = fit(fabric, objective, train.loader(budget.batch_size, True, params.seed, drop_last=True), evaluate,
                     budget, "itc_r1", ckpt, curve,
                     fingerprint(recipe.model_dump(), params.student.model_dump(), budget.model_dump(), params.seed,
                                 paths.model_dir("teacher_pretrain"), paths.PREPARED / "pretrain"),
                     params.seed, tracker, head_prefixes=("model.fusion", "model.itm_score", "model.text_proj",
                                                          "model.image_proj"))
        result.best_state = _strip(result.best_state)
        return _finish(fabric, student, result, paths.model_dir(stage), paths.train_metrics(stage, "pretrain"), ckpt,
                       {}, tracker, curve)


def _finetune_student(params: Params, recipe):
    """The student a fine-tuning distillation starts from.

    ``student.kind=dual``: from ``distill_pretrain`` when 'pretrain' is in the recipe's stages, else both towers from
    the pre-trained teacher. ``student.kind=fusion``: a smaller ViLT from the pre-trained teacher (see
    :func:`vldistill.models.fusion.fusion_student`).
    """
    if params.student.kind == "dual" and "pretrain" in recipe.stages:
        return DualEncoder.load(paths.model_dir("distill_pretrain"))
    pretrained = ViltTeacher.load(paths.model_dir("teacher_pretrain"))
    if params.student.kind == "fusion":
        return fusion_student(pretrained, params.student, heads=("nlvr2",))
    return DualEncoder.from_teacher(pretrained, params.student.fusion_hidden)


def distill_finetune(params: Params, task: str, variant: str) -> dict:
    """Fine-tuning distillation of one named variant on ``task``: student from ``distill_pretrain`` when 'pretrain'
    is in the recipe's stages (else from the pre-trained teacher), knowledge from the fine-tuned teacher."""
    if task != "nlvr2":
        raise ValueError(f"distill_finetune: task {task!r} is not implemented yet (available: nlvr2)")
    stage, budget, recipe = "distill_finetune", params.train.distill_finetune, params.variant(variant)
    fabric = make_fabric(params.fabric, params.seed)
    tokenizer = tok.load(paths.TOKENIZER)
    train, dev = _split(params, task, "train", tokenizer), _split(params, task, "dev", tokenizer)
    teacher = ViltTeacher.load(paths.model_dir("teacher_finetune", task)).eval().requires_grad_(False)
    teacher = fabric.to_device(teacher)
    student = _finetune_student(params, recipe)
    pairs = objectives.distill_pairs(recipe, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    extras = KnowledgeModules(set(recipe.knowledge), pairs, student.config.hidden_size, teacher.config.hidden_size,
                              recipe.nce.queue_size, recipe.nce.temperature)
    teacher_layers = sorted({t for _, t in pairs})
    views = objectives.needs_views(recipe.knowledge)
    if set(recipe.knowledge) == {"gt"}:
        teacher_fn = None
    elif recipe.cache_teacher and set(recipe.knowledge) <= objectives.CACHEABLE:
        teacher_fn = objectives.cache_teacher_targets(teacher, train, teacher_layers, views, 256, fabric.device)
    else:
        teacher_fn = lambda batch: objectives.teacher_nlvr2_targets(teacher, batch, teacher_layers, views)  # noqa: E731
    objective = objectives.Objective(student, objectives.dide_nlvr2_loss(recipe, pairs, teacher_fn, extras), extras)
    ckpt, curve = paths.checkpoint_dir(stage, task, variant), paths.curve_path(stage, task, variant)
    with Tracker(stage, flatten({"seed": params.seed, "distill": recipe, "student": params.student,
                                 f"train.{stage}": budget}), task=task, variant=variant,
                 enabled=fabric.is_global_zero) as tracker:
        result = fit(fabric, objective, train.loader(budget.batch_size, True, params.seed, drop_last=True),
                     lambda m: {"accuracy": nlvr2_accuracy(m.model, dev, device=fabric.device)}, budget, "accuracy",
                     ckpt, curve,
                     fingerprint(recipe.model_dump(), params.student.model_dump(), budget.model_dump(), params.seed,
                                 paths.model_dir("teacher_finetune", task), paths.model_dir("distill_pretrain"),
                                 paths.PREPARED / task),
                     params.seed, tracker, head_prefixes=("model.fusion", "model.classifier", "extras"))
        result.best_state = _strip(result.best_state)
        return _finish(fabric, student, result, paths.model_dir(stage, task, variant),
                       paths.train_metrics(stage, task, variant), ckpt, {"knowledge": "+".join(recipe.knowledge)},
                       tracker, curve)
