"""The schema of ``params.yaml`` and its loader.

Every stage calls :func:`load` (or :func:`load_or_exit`) before it does any work, so a bad knob fails in seconds with
one line that names the dotted key, the bad value and what is allowed. The library never reads ``params.yaml``
itself: stages pass the validated :class:`Params` (or a sub-object) in.
"""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vldistill.paths import replica_name

TASKS = ("nlvr2", "snli_ve", "vqa", "retrieval")
"""Downstream tasks: teacher fine-tuning, distillation and evaluation run end to end for each."""
KNOWLEDGE = ("gt", "soft", "hidden", "attn_all", "attn_cross", "attn_uni", "attn_mse", "token_nce")
"""Every name ``distill.knowledge`` may hold."""
IMPLEMENTED_KNOWLEDGE = KNOWLEDGE
"""The subset the students can be trained with in this version (all of them)."""


class ConfigError(ValueError):
    """A params file that does not fit the schema; ``str(err)`` is the one line shown to the user."""


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are never silently coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ----------------------------------------------------------------------------------------------------------- data
class SceneParams(Strict):
    """The coarse grid of coloured shapes every generated (``shapes``) task draws its images from."""

    grid: int = Field(3, ge=2, le=8, description="cells per side")
    cell: int = Field(16, ge=8, le=64, description="pixels per cell (= one ViLT patch when equal to patch_size)")
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(4, ge=1)
    jitter: float = Field(0.1, ge=0.0, le=0.3, description="relative colour and size jitter")

    @model_validator(mode="after")
    def _objects_fit(self):
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={self.min_objects}: must be <= max_objects={self.max_objects}")
        if self.max_objects > self.grid * self.grid:
            raise ValueError(f"max_objects={self.max_objects}: must be <= grid*grid={self.grid * self.grid}")
        return self


def _non_empty(values: list, what: str) -> list:
    if not values:
        raise ValueError(f"must name at least one {what}")
    return values


class SplitSizes(Strict):
    train: int = Field(ge=1)
    dev: int = Field(ge=1)
    test: int = Field(ge=1)


class OfficialSource(Strict):
    """Where an official release lives: ``root`` laid out as the release unpacks; when ``root`` is missing and
    ``url`` is set, prepare downloads it (resumable, checked against ``sha256``). Images are fitted into
    ``image_size = [H, W]`` (aspect kept, padded) once, at prepare time, by ``decode_workers`` processes; an
    unreadable image stops prepare naming the file, unless ``skip_bad_images`` (then at most ``max_bad_fraction``
    of the images may be left out, with the examples that refer to them)."""

    root: str | None = None
    url: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    image_size: list[int] = [384, 640]
    decode_workers: int | None = Field(None, ge=0, description="official: processes decoding the images into the "
                                       "store (null: every usable core; 0 or 1: the prepare process); same bytes")
    skip_bad_images: bool = Field(False, description="official: drop the examples of unreadable images (listed in "
                                  "metrics/data/<task>.json) instead of stopping at the first one")
    max_bad_fraction: float = Field(0.001, ge=0, le=1, description="official, with skip_bad_images: more unreadable "
                                    "images than this fraction of the store still stop prepare")

    @model_validator(mode="after")
    def _official_needs_root(self):
        if getattr(self, "source", None) == "official" and not self.root:
            raise ValueError("root=null: source 'official' needs root, the directory the official release unpacks into")
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise ValueError(f"image_size={self.image_size}: must be [height, width], each >= 16")
        return self


class PretrainData(OfficialSource):
    """Image–caption corpus for pre-training (``shapes``: generated scenes with several true captions each)."""

    source: Literal["shapes", "official"] = "shapes"
    images: SplitSizes = SplitSizes(train=4000, dev=200, test=200)
    vg_root: str | None = Field(None, description="official: Visual Genome root whose region descriptions join train")
    vg_regions_per_image: int = Field(5, ge=1)
    captions_per_image: int = Field(3, ge=1, le=10)


NLVR2_TEMPLATES = ("contains", "both", "more", "at_least", "relation")
NLVR2_OPTIONAL_TEMPLATES = ("neither", "exactly_one", "fewer", "exactly")


class Nlvr2Data(OfficialSource):
    """Pairs of scenes with a statement about the pair; label True/False, balanced per template."""

    source: Literal["shapes", "official"] = "shapes"
    pairs: SplitSizes = SplitSizes(train=20000, dev=1000, test=2000)
    templates: list[Literal[NLVR2_TEMPLATES + NLVR2_OPTIONAL_TEMPLATES]] = list(NLVR2_TEMPLATES)

    _templates = field_validator("templates")(classmethod(lambda cls, v: _non_empty(v, "template")))


class SnliVeData(OfficialSource):
    """One (partly occluded) scene + a hypothesis; entailment / neutral / contradiction by determinability."""

    source: Literal["shapes", "official"] = "shapes"
    pairs: SplitSizes = SplitSizes(train=20000, dev=1000, test=2000)
    templates: list[Literal["exists", "at_least", "at_most", "relation"]] = ["exists", "at_least", "at_most", "relation"]
    max_occluders: int = Field(2, ge=1, le=3, description="grey cells hiding whatever lies below (labels enumerate them)")

    _templates = field_validator("templates")(classmethod(lambda cls, v: _non_empty(v, "template")))


class VqaData(OfficialSource):
    """Questions about one image with soft-scored answers (``easy_vqa``: the data set shipped by the PyPI package)."""

    source: Literal["easy_vqa", "official"] = "easy_vqa"
    min_answer_freq: int = Field(1, ge=1, description="answers seen fewer times in train are dropped (paper: 9)")
    holdout_images: int = Field(400, ge=1, description="the last N training images form dev (paper: 1000)")
    easy_vqa_size: int = Field(48, ge=16, description="easy_vqa: images are resized to this square size")
    max_questions: SplitSizes | None = Field(None, description="easy_vqa: keep a seeded random subset of at most this "
                                                               "many questions per split (null: all)")


class RetrievalData(OfficialSource):
    """Images with several captions each, Karpathy-style splits (image-level)."""

    source: Literal["shapes", "official"] = "shapes"
    images: SplitSizes = SplitSizes(train=3000, dev=100, test=100)
    captions_per_image: int = Field(5, ge=1, le=10)


class LoaderParams(Strict):
    """The DataLoader of every split a training stage reads (:class:`vldistill.data.datasets.SplitLoader`): worker
    processes gather each batch's images from the memory-mapped store and RandAugment them (``train.augment``), the
    batch goes to the device (pinned memory on CUDA), where the images become float pixels. A batch depends on its
    example indices and the seed only: results are the same for any value of these knobs."""

    num_workers: int = Field(0, ge=0, le=256, description="worker processes per training process (0: none, the "
                                                          "batch is gathered in the training process)")
    prefetch_factor: int = Field(2, ge=1, le=64, description="batches each worker prepares ahead (num_workers > 0)")


class DataParams(Strict):
    loader: LoaderParams = LoaderParams()
    scene: SceneParams = SceneParams()
    pretrain: PretrainData = PretrainData()
    nlvr2: Nlvr2Data | None = Nlvr2Data()
    snli_ve: SnliVeData | None = SnliVeData()
    vqa: VqaData | None = VqaData()
    retrieval: RetrievalData | None = RetrievalData()


class TokenizerParams(Strict):
    """``pretrained: null`` builds a WordPiece vocabulary from the enabled tasks' training texts (embedded: special
    tokens, characters, then whole words by frequency; see ``vldistill.data.tokenizer``); a hub id
    (``bert-base-uncased``, as ViLT) or a local directory loads that tokenizer instead (paper scale)."""

    vocab_size: int = Field(1000, ge=50, le=100_000, description="upper bound for the built WordPiece vocabulary")
    pretrained: str | None = None


# ------------------------------------------------------------------------------------------------------- models
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
"""A Hugging Face hub model id ``owner/name`` (no revision, no sub-folder)."""


def is_local_form(source: str) -> bool:
    """A checkpoint source written as a path: starts with ``/ ./ ../ ~`` or has more than one ``/``."""
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


def _check_checkpoint_source(source: str) -> str:
    """A hub id ``owner/name`` or a local ``save_pretrained`` directory (its existence is checked at load time by
    :func:`vldistill.models.hub.check_sources`, not here: params are validated the same on every machine)."""
    if not source.strip() or source != source.strip():
        raise ValueError("must be a hub id 'owner/name' or a local directory written with a '/' (e.g. ./vilt)")
    if not (HUB_ID.match(source) or is_local_form(source)):
        raise ValueError("must be a hub id 'owner/name' (e.g. dandelin/vilt-b32-mlm) or a local directory written "
                         "with a '/' (e.g. ./vilt)")
    return source


CheckpointSource = Annotated[str, AfterValidator(_check_checkpoint_source)]


class TeacherParams(Strict):
    """The ViLT fusion encoder (transformers' ViltConfig knobs).

    ``init: scratch`` pre-trains it here (MLM + ITM); a hub id (``dandelin/vilt-b32-mlm``) or a local
    ``save_pretrained`` directory loads that checkpoint instead (the size knobs must then match it).
    ``finetuned`` maps a task to an already fine-tuned ViLT checkpoint used as that task's teacher; tasks left out
    are fine-tuned by the pipeline."""

    init: str = Field("scratch", description="scratch | hub id owner/name | local save_pretrained directory")
    finetuned: dict[Literal[TASKS], CheckpointSource] = Field(
        {}, description="task -> hub id or local directory of a fine-tuned ViLT checkpoint (teacher_finetune loads it)")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    patch_size: int = Field(16, ge=1)
    max_text_len: int = Field(18, ge=4, le=512)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_mlm_decoder: bool = Field(
        False, description="tie the MLM decoder to the word embeddings (ViLT does; checkpoints loaded from the hub "
                           "keep their own tying)")
    pixel_norm: Literal["unit", "vilt"] = Field(
        "unit", description="unit: x/255 (black background = 0); vilt: (x/255 - 0.5)/0.5"
    )

    @field_validator("init")
    @classmethod
    def _init_form(cls, init: str) -> str:
        return init if init == "scratch" else _check_checkpoint_source(init)

    @field_validator("finetuned", mode="before")
    @classmethod
    def _finetuned_mapping(cls, finetuned):
        return {} if finetuned is None else finetuned  # `finetuned:` with every entry commented out

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size}: must be a multiple of num_heads={self.num_heads}")
        return self


class StudentParams(Strict):
    """``dual``: the DiDE dual encoder (towers = copies of the teacher); ``fusion``: a smaller ViLT (DistillVLM)."""

    kind: Literal["dual", "fusion"] = "dual"
    fusion_hidden: int = Field(256, ge=8, description="dual: width of the fusion MLP over [text_cls; image_cls]")
    num_layers: int | None = Field(None, ge=1, description="fusion: depth (default: half the teacher's, at least 1)")
    hidden_size: int | None = Field(None, ge=8, description="fusion: width (default: the teacher's)")
    num_heads: int | None = Field(None, ge=1, description="fusion: attention heads (default: the teacher's)")
    init: Literal["teacher", "scratch"] = Field(
        "teacher", description="fusion: copy the teacher's embeddings and a uniform subset of its layers (needs the "
                               "teacher's width and heads), or start from random weights")


class NceParams(Strict):
    queue_size: int = Field(4096, ge=1, description="token_nce: FIFO queue of past teacher token states")
    temperature: float = Field(0.07, gt=0)


class DistillWeights(Strict):
    gt: float = Field(1.0, ge=0)
    soft: float = Field(1.0, ge=0)
    hidden: float = Field(1.0, ge=0)
    attn_all: float = Field(1.0, ge=0)
    attn_cross: float = Field(1.0, ge=0)
    attn_uni: float = Field(1.0, ge=0)
    attn_mse: float = Field(1.0, ge=0)
    token_nce: float = Field(1.0, ge=0)


Knowledge = Literal[KNOWLEDGE]


def _check_knowledge(knowledge: list[str] | None) -> list[str] | None:
    if knowledge is None:
        return None
    if not knowledge:
        raise ValueError(f"must name at least one of {list(KNOWLEDGE)}")
    missing = [k for k in knowledge if k not in IMPLEMENTED_KNOWLEDGE]
    if missing:
        raise ValueError(f"{missing} not implemented yet; allowed: {list(IMPLEMENTED_KNOWLEDGE)}")
    if len(set(knowledge)) != len(knowledge):
        raise ValueError("names a term twice")
    if not {"gt", "soft"} & set(knowledge):  # else the task head (and the towers' tops) never train, DDP fails
        raise ValueError("no term on the task outputs: add 'gt' or 'soft' (else the task head never trains)")
    return knowledge


def _check_stages(stages: list[str] | None) -> list[str] | None:
    if stages is not None and "finetune" not in stages:
        raise ValueError("must contain 'finetune' (the task student is always fine-tuned); allowed: [finetune], [pretrain, finetune]")
    return stages


class DistillParams(Strict):
    """The main recipe (model name ``dide``); ablation variants override fields of it."""

    knowledge: list[Knowledge] = ["gt", "soft", "attn_cross"]
    layers: Literal["last", "layerwise"] = "last"
    stages: list[Literal["pretrain", "finetune"]] = ["pretrain", "finetune"]
    temperature: float = Field(1.0, gt=0)
    weights: DistillWeights = DistillWeights()
    nce: NceParams = NceParams()
    cache_teacher: bool = Field(True, description="precompute the frozen teacher's targets once per stage")

    _knowledge = field_validator("knowledge")(classmethod(lambda cls, v: _check_knowledge(v)))

    @field_validator("stages")
    @classmethod
    def _finetune_always(cls, stages):
        return _check_stages(stages)


class VariantParams(Strict):
    """One named student trained by ``distill_finetune@<task>-<variant>`` (once per seed of ``seeds``): fields left
    out come from ``distill`` (recipe) and ``student.kind`` (student)."""

    knowledge: list[Knowledge] | None = None
    layers: Literal["last", "layerwise"] | None = None
    stages: list[Literal["pretrain", "finetune"]] | None = None
    student: Literal["dual", "fusion"] | None = Field(None, description="dual encoder or small fusion student")

    _knowledge = field_validator("knowledge")(classmethod(lambda cls, v: _check_knowledge(v)))
    _stages = field_validator("stages")(classmethod(lambda cls, v: _check_stages(v)))

    def resolve(self, base: DistillParams) -> DistillParams:
        """The full distillation recipe of this variant: ``base`` with this variant's recipe fields replaced."""
        recipe = self.model_dump(exclude_none=True, exclude={"student"})
        return DistillParams(**{**base.model_dump(), **recipe})


class RunParams(Strict):
    """One fine-tuning distillation run, ``distill_finetune@<task>-<variant>`` (the key of ``runs``): the variant
    trained on the task once per seed of ``seeds``, each replica its own model ``<variant>_seed<k>``."""

    task: Literal[TASKS]
    variant: str


# -------------------------------------------------------------------------------------------------- execution
class FabricParams(Strict):
    accelerator: Literal["cpu", "cuda", "gpu", "mps", "auto"] = "cpu"
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "fsdp", "dp"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    seed_per_batch: bool = Field(False, description="reseed torch before every batch from its place in the epoch "
                                 "(vldistill.train.loop.batch_seed): random draws of the losses then do not depend on "
                                 "the number of processes, and W processes train as one with accumulation")

    @model_validator(mode="after")
    def _precision_fits(self):
        """What never works on ``accelerator: cpu`` (Lightning would refuse, or silently change it). Whether this
        machine has the accelerator and ``devices`` of it is checked when a training stage starts
        (:func:`vldistill.cli.machine_error`), not here: params are validated the same on every machine."""
        if self.accelerator == "cpu" and self.precision == "16-mixed":
            raise ValueError("precision=16-mixed: needs a GPU; use '32-true' or 'bf16-mixed' on cpu")
        if self.strategy == "fsdp":
            raise ValueError("strategy=fsdp: not supported (FSDP needs GPUs, so it was never run here, and the dev "
                             "evaluation calls the student outside FSDP's forward); use 'ddp': a ViLT-B/32 dual "
                             "student with its AdamW state needs ~3.3 GB, one GPU holds it whole")
        if self.accelerator == "cpu" and self.strategy == "dp":
            raise ValueError(f"strategy={self.strategy}: needs a GPU accelerator; use 'ddp' (or 'auto') on cpu")
        return self


class StageBudget(Strict):
    """Optimisation budget of one training stage (AdamW, linear warm-up then linear decay)."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="examples per forward pass per process")
    effective_batch: int | None = Field(None, ge=1, description="examples per optimizer step (gradient accumulation)")
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    head_lr_mult: float = Field(1.0, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(25, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="optimizer steps between resume checkpoints "
                                         "(null: at epoch ends only; written at every epoch end anyway)")

    @model_validator(mode="after")
    def _accumulation_divides(self):
        if self.effective_batch is not None and self.effective_batch % self.batch_size:
            raise ValueError(f"effective_batch={self.effective_batch}: must be a multiple of batch_size={self.batch_size}")
        return self


class BudgetOverride(Strict):
    """Per-task changes to a stage's :class:`StageBudget`; fields left out come from the stage's budget."""

    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    effective_batch: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    head_lr_mult: float | None = Field(None, gt=0)
    grad_clip: float | None = Field(None, gt=0)
    log_every: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)

    def resolve(self, base: StageBudget) -> StageBudget:
        """``base`` with the fields set here replaced (an explicit ``effective_batch: null`` turns accumulation off)."""
        return StageBudget(**{**base.model_dump(), **self.model_dump(exclude_unset=True)})


class AugmentParams(Strict):
    """RandAugment (torchvision ``v2.RandAugment``) on the training images of the listed stages; ViLT fine-tunes
    with N=2 ops at magnitude 9 of 30. Dev/test images and every pre-training stage are never augmented."""

    randaugment: bool = False
    num_ops: int = Field(2, ge=1, le=14, description="ops applied in sequence to each image (RandAugment's N)")
    magnitude: int = Field(9, ge=0, le=30, description="strength of every op, on torchvision's 31 bins (M)")
    stages: list[Literal["teacher_finetune", "distill_finetune"]] = ["teacher_finetune", "distill_finetune"]


ABLATION_TABLES = ("knowledge", "layers", "stages", "distillvlm")
"""The ablation tables of the report (4: knowledge, 5: layers, 6: one vs two stages, 7: DistillVLM losses)."""

PER_TASK_STAGES = ("teacher_finetune", "distill_finetune")
"""Stages whose budget may be overridden per task by ``train.<stage>_tasks.<task>``."""


class TrainParams(Strict):
    """One budget per training stage; ``<stage>_tasks`` overrides it per task (see :meth:`Params.budget`)."""

    teacher_pretrain: StageBudget = StageBudget(epochs=10, batch_size=64, lr=1e-3)
    teacher_finetune: StageBudget = StageBudget(epochs=10, batch_size=64, lr=1e-3)
    distill_pretrain: StageBudget = StageBudget(epochs=2, batch_size=64, lr=5e-4)
    distill_finetune: StageBudget = StageBudget(epochs=8, batch_size=64, lr=5e-4)
    retrieval_negatives: int = Field(3, ge=1, description="retrieval: hard negative images per caption (ITM / soft)")
    teacher_finetune_tasks: dict[Literal[TASKS], BudgetOverride] = {}
    distill_finetune_tasks: dict[Literal[TASKS], BudgetOverride] = {}
    augment: AugmentParams = AugmentParams()

    @model_validator(mode="after")
    def _overrides_fit(self):
        for stage in PER_TASK_STAGES:
            for task, override in getattr(self, f"{stage}_tasks").items():
                try:
                    override.resolve(getattr(self, stage))
                except ValidationError as err:
                    message = err.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{stage}_tasks.{task}.{message} (with train.{stage})") from None
        return self


def _check_timing(section):
    """Shared checks of a timing section: batch sizes positive, ``min_repeats <= max_repeats``."""
    sizes = section.batch_sizes
    if sizes is not None and (not sizes or any(b < 1 for b in sizes) or len(set(sizes)) != len(sizes)):
        raise ValueError(f"batch_sizes={sizes}: must be a non-empty list of distinct positive ints")
    if section.min_repeats > section.max_repeats:
        raise ValueError(f"min_repeats={section.min_repeats}: must be <= max_repeats={section.max_repeats}")
    return section


class PaperArchitecture(Strict):
    """The models timed at ``paper`` scale: ViLT-B/32 (DiDE's teacher) and its dual encoder, random weights (timing
    does not depend on them), one image of ``image_size = [H, W]`` (241 image tokens at 384×640) and ``text_len``
    text tokens. The defaults ARE the paper's size; tests shrink them to run in seconds."""

    hidden_size: int = Field(768, ge=8)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=8)
    patch_size: int = Field(32, ge=1)
    image_size: list[int] = Field([384, 640], description="[H, W] in pixels, multiples of patch_size")
    text_len: int = Field(40, ge=4, le=512, description="text tokens per example (ViLT's max_text_len)")
    vocab_size: int = Field(30522, ge=8, description="bert-base-uncased")
    vqa_answers: int = Field(3129, ge=1, description="VQAv2 answers of ViLT's head")
    fusion_hidden: int = Field(768, ge=8, description="width of the dual encoder's fusion MLP")

    @model_validator(mode="after")
    def _shapes_fit(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size}: must be a multiple of num_heads={self.num_heads}")
        if len(self.image_size) != 2 or any(s < self.patch_size or s % self.patch_size for s in self.image_size):
            raise ValueError(f"image_size={self.image_size}: must be [H, W], multiples of patch_size={self.patch_size}")
        return self


class PaperBenchParams(Strict):
    """Latency at the paper's size (:class:`PaperArchitecture`) on ``bench.device``, beside the trained embedded
    models. On CPU one ViLT-B/32 pass takes about a second, hence few repeats, a time cap per measurement and
    ``warmup`` calls once per model (before its smallest batch; before every batch on CUDA)."""

    enabled: bool = True
    batch_sizes: list[int] | None = Field(None, description="null: bench.batch_sizes")
    warmup: int = Field(1, ge=0, description="untimed calls per model before its first measurement")
    min_repeats: int = Field(2, ge=1)
    max_repeats: int = Field(10, ge=1)
    rel_tol: float = Field(0.05, gt=0, description="stop repeating once the median moves less than this")
    max_seconds: float | None = Field(
        8.0, gt=0, description="stop repeating once a measurement's timed calls add up to this (after min_repeats)")
    threads: int = Field(2, ge=1, description="torch intra-op threads while timing on CPU")
    retrieval_pairs: int = Field(2, ge=1, description="teacher (caption, image) pairs per timed call")
    retrieval_batch: int = Field(8, ge=1, description="images / captions per timed dual-encoder encoding call")
    architecture: PaperArchitecture = PaperArchitecture()

    _valid = model_validator(mode="after")(_check_timing)


class BenchParams(Strict):
    """``benchmark``: latency per example (``metrics/bench/latency.json``) of the trained embedded models and, with
    ``paper.enabled``, of ViLT-B/32-size ones; retrieval cost against the gallery size N (N images, 5N captions) for
    N in 100, 300, 1000, 5000 up to ``retrieval_max`` (``metrics/bench/retrieval.json``)."""

    batch_sizes: list[int] = [1, 32]
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] | None = Field(
        None, description="forward passes under this precision's autocast (null: fabric.precision)")
    warmup: int = Field(3, ge=0, description="untimed calls before every measurement")
    min_repeats: int = Field(5, ge=3)
    max_repeats: int = Field(50, ge=3)
    rel_tol: float = Field(0.05, gt=0, description="stop repeating once the median moves less than this")
    max_seconds: float | None = Field(
        None, gt=0, description="stop repeating once a measurement's timed calls add up to this (after min_repeats)")
    threads: int = Field(1, ge=1, description="torch intra-op threads while timing")
    retrieval_max: int = Field(1000, ge=100, description="largest gallery size N timed (of 100, 300, 1000, 5000)")
    retrieval_pairs: int = Field(256, ge=1, description="teacher (caption, image) pairs per timed call")
    retrieval_batch: int = Field(256, ge=1, description="images / captions per dual-encoder encoding call")
    paper: PaperBenchParams = PaperBenchParams()

    _valid = model_validator(mode="after")(_check_timing)

    @model_validator(mode="after")
    def _precision_fits(self):
        if self.device == "cpu" and self.precision == "16-mixed":
            raise ValueError("precision=16-mixed: needs device=cuda; use '32-true' or 'bf16-mixed' on cpu")
        return self

    def precision_of(self, fabric: FabricParams) -> str:
        """The precision timed: ``precision``, or ``fabric.precision`` when it is null."""
        return self.precision or fabric.precision


class EvaluateParams(Strict):
    """``evaluate@<task>`` (runs on ``fabric.*``'s device and precision, sharded over its processes). Retrieval of
    fusion models (the teacher, fusion students): ``rerank_k: null`` scores every (caption, image) pair jointly (the
    exact full ranking); ``k`` re-scores only the top-``k`` candidates of the dual encoder ``rerank_with`` in each
    direction (ALBEF/BLIP-style), the rest ranked below them: N·k joint passes per direction instead of
    N_text·N_image, and recall@K an approximation that needs K <= k."""

    rerank_k: int | None = Field(None, ge=1, description="null: full ranking; k: re-rank the dual encoder's top-k")
    rerank_with: str = Field("dide", description="the variant (a dual student trained on retrieval by runs) whose "
                                                 "similarities choose the candidates")


class AblationParams(Strict):
    """The ablation tables of the report (4–7): ``tables`` says which variants each one compares; every variant
    listed must be trained on ``task`` by ``runs`` (so at the main runs' budget, over every seed of ``seeds``)."""

    task: Literal[TASKS] = "nlvr2"
    tables: dict[Literal[ABLATION_TABLES], list[str]] = {}


class ReportParams(Strict):
    decimals: int = Field(1, ge=0, le=4)


class ExportParams(Strict):
    """``export@<task>``: the HF-format directory and the ONNX graphs of each trained dual student."""

    opset: int = Field(17, ge=14, le=21, description="ONNX opset of the exported graphs")
    atol: float = Field(1e-4, gt=0, description="largest |onnxruntime - PyTorch| accepted on the parity batch")
    parity_examples: int = Field(8, ge=2, description="test examples the exported graphs are checked on")
    variants: list[str] = Field(["dide", "dual_gt"], description="dual students exported (each task's that runs "
                                "trains; the replica of the first seed)")


class DeployBenchParams(Strict):
    """``deploy_benchmark`` (``metrics/bench/deploy.json``): onnxruntime vs PyTorch eager per tower at the embedded
    and (``paper``) ViLT-B/32 size, FAISS exact vs approximate search over synthetic galleries, end-to-end query."""

    batch_sizes: list[int] = [1, 32]
    warmup: int = Field(2, ge=0, description="untimed calls before every measurement")
    min_repeats: int = Field(3, ge=1)
    max_repeats: int = Field(20, ge=1)
    rel_tol: float = Field(0.05, gt=0, description="stop repeating once the median moves less than this")
    max_seconds: float | None = Field(5.0, gt=0, description="stop repeating once the timed calls add up to this")
    threads: int = Field(1, ge=1, description="torch, onnxruntime and FAISS threads while timing")
    paper: bool = Field(True, description="also time the towers at bench.paper.architecture (random weights)")
    gallery_sizes: list[int] = Field([10_000, 100_000, 1_000_000], description="synthetic FAISS gallery sizes")
    dim: int = Field(128, ge=8, description="embedding width of the synthetic galleries")
    queries: int = Field(200, ge=10, description="queries per FAISS measurement (recall@10 and queries/s)")
    approx: Literal["ivf", "hnsw"] = "ivf"
    ivf_lists: int | None = Field(None, ge=1, description="IVF cells (null: sqrt(N))")
    ivf_probe: int = Field(16, ge=1, description="IVF cells visited per query")
    hnsw_m: int = Field(16, ge=4, description="HNSW neighbours per node")
    hnsw_ef_search: int = Field(64, ge=10, description="HNSW candidate list while searching")

    _valid = model_validator(mode="after")(_check_timing)

    @field_validator("gallery_sizes")
    @classmethod
    def _sizes(cls, sizes: list[int]) -> list[int]:
        if not sizes or min(sizes) < 100:
            raise ValueError(f"gallery_sizes={sizes}: must be a non-empty list of sizes >= 100")
        return sizes


class DeployParams(Strict):
    export: ExportParams = ExportParams()
    bench: DeployBenchParams = DeployBenchParams()


class Params(Strict):
    seed: int = Field(0, ge=0, description="data generation, teachers and distill_pretrain")
    seeds: list[int] = Field([0, 1, 2], description="training seeds of every fine-tuned student: each run of runs "
                             "trains one replica per seed (tables: mean ± std and a 95% interval)")
    tasks: list[Literal[TASKS]] = ["nlvr2"]
    data: DataParams = DataParams()
    tokenizer: TokenizerParams = TokenizerParams()
    teacher: TeacherParams = TeacherParams()
    student: StudentParams = StudentParams()
    distill: DistillParams = DistillParams()
    variants: dict[str, VariantParams] = {"dide": VariantParams(), "dual_gt": VariantParams(knowledge=["gt"])}
    runs: dict[str, RunParams] = {"nlvr2-dide": RunParams(task="nlvr2", variant="dide"),
                                  "nlvr2-dual_gt": RunParams(task="nlvr2", variant="dual_gt")}
    fabric: FabricParams = FabricParams()
    train: TrainParams = TrainParams()
    bench: BenchParams = BenchParams()
    evaluate: EvaluateParams = EvaluateParams()
    ablation: AblationParams = AblationParams()
    report: ReportParams = ReportParams()
    deploy: DeployParams = DeployParams()

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds={seeds}: must be a non-empty list of distinct non-negative ints")
        return seeds

    @model_validator(mode="after")
    def _consistent(self):
        for task in self.tasks:
            if getattr(self.data, task, None) is None:
                raise ValueError(f"data.{task}=null: task {task!r} is in tasks, so it needs a data source "
                                 f"(set data.{task} or remove {task!r} from tasks)")
        if "dide" not in self.variants:
            raise ValueError(f"variants={sorted(self.variants)}: must define 'dide' (the main recipe, usually {{}})")
        for name in self.variants:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"variants.{name}: a variant name must be letters, digits and '_'")
            if name == "teacher":
                raise ValueError("variants.teacher: 'teacher' names the fine-tuned teacher (metrics/eval/<task>/"
                                 "teacher.json); give the student another name")
        for key, run in self.runs.items():
            if key != f"{run.task}-{run.variant}":
                raise ValueError(f"runs.{key}: the key must be '<task>-<variant>' = '{run.task}-{run.variant}'")
            if run.task not in self.tasks:
                raise ValueError(f"runs.{key}.task={_shown(run.task)}: not in tasks {list(self.tasks)}")
            if run.variant not in self.variants:
                raise ValueError(f"runs.{key}.variant={_shown(run.variant)}: not in variants {sorted(self.variants)}")
        return self

    @model_validator(mode="after")
    def _rerank_model_exists(self):
        """``evaluate.rerank_k`` needs ``evaluate.rerank_with`` to be a dual student that ``runs`` trains on
        retrieval (evaluate@retrieval reads its checkpoint)."""
        knobs = self.evaluate
        if knobs.rerank_k is None or "retrieval" not in self.tasks:
            return self
        trained = self.task_variants("retrieval")
        if knobs.rerank_with not in trained:
            raise ValueError(f"evaluate.rerank_with={_shown(knobs.rerank_with)}: evaluate.rerank_k is set, so it must "
                             f"be a variant that runs trains on retrieval (have: {trained})")
        if self.student_kind(knobs.rerank_with) != "dual":
            raise ValueError(f"evaluate.rerank_with={_shown(knobs.rerank_with)}: must be a dual-encoder student (its "
                             "similarity matrix chooses the candidates); it is a fusion student")
        return self

    @model_validator(mode="after")
    def _ablation_consistent(self):
        """Every variant of an ablation table is one that ``runs`` trains on ``ablation.task``."""
        study = self.ablation
        if study.tables and study.task not in self.tasks:
            raise ValueError(f"ablation.task={_shown(study.task)}: not in tasks {list(self.tasks)}")
        trained = self.task_variants(study.task)
        for table, names in study.tables.items():
            if len(set(names)) != len(names):
                raise ValueError(f"ablation.tables.{table}={names}: lists a variant twice")
            for i, name in enumerate(names):
                if name not in trained:
                    raise ValueError(f"ablation.tables.{table}[{i}]={_shown(name)}: not a variant that runs trains "
                                     f"on ablation.task={study.task} (have: {trained})")
        return self

    def variant(self, name: str) -> DistillParams:
        """The full recipe of a named variant (see :class:`VariantParams`)."""
        if name not in self.variants:
            raise ConfigError(f"variant {name!r} is not in variants (defined: {sorted(self.variants)})")
        return self.variants[name].resolve(self.distill)

    @model_validator(mode="after")
    def _augment_fits_cache(self):
        augment = self.train.augment
        if augment.randaugment and "distill_finetune" in augment.stages and self.distill.cache_teacher:
            raise ValueError("distill.cache_teacher=true: must be false when train.augment.randaugment applies to "
                             "distill_finetune (the teacher must see each augmented batch)")
        return self

    @model_validator(mode="after")
    def _student_fits_teacher(self):
        """The small fusion student (``student.kind: fusion`` or a variant with ``student: fusion``) must be
        buildable from the teacher: heads divide its width; ``init: teacher`` copies the teacher's layers, so same
        width and heads; student layer ``i`` maps onto teacher layer ``round((i + 1) · L_t / L_s) − 1``, which is a
        layer only when the student is not deeper than the teacher (``init: teacher`` and ``layerwise``)."""
        fusion = [name for name in self.variants if self.student_kind(name) == "fusion"]
        if not fusion:
            return self
        s, t = self.student, self.teacher
        width, heads = s.hidden_size or t.hidden_size, s.num_heads or t.num_heads
        depth = s.num_layers or max(1, t.num_layers // 2)
        if width % heads:
            if s.num_heads:
                raise ValueError(f"student.num_heads={heads}: must divide the fusion student's width {width} "
                                 "(student.hidden_size; null = teacher.hidden_size)")
            raise ValueError(f"student.hidden_size={width}: must be a multiple of the fusion student's {heads} heads "
                             "(student.num_heads; null = teacher.num_heads)")
        if s.init == "teacher":
            for knob, mine, theirs, what in (("hidden_size", s.hidden_size, t.hidden_size, "width"),
                                             ("num_heads", s.num_heads, t.num_heads, "number of heads")):
                if mine is not None and mine != theirs:
                    raise ValueError(f"student.{knob}={mine}: must equal teacher.{knob}={theirs} with student.init="
                                     "teacher (the teacher's layers are copied); use student.init=scratch for another "
                                     f"{what}")
        layerwise = [name for name in fusion if self.variant(name).layers == "layerwise"]
        if depth > t.num_layers and (s.init == "teacher" or layerwise):
            why = ("student.init=teacher copies one teacher layer per student layer" if s.init == "teacher" else
                   f"variant {layerwise[0]!r} uses distill.layers=layerwise, which maps each student layer onto one "
                   "teacher layer")
            raise ValueError(f"student.num_layers={depth}: must be <= teacher.num_layers={t.num_layers} ({why})")
        return self

    @model_validator(mode="after")
    def _something_to_learn(self):
        """Each recipe needs one term of its ``knowledge`` with a weight > 0 (else the loss is a constant 0)."""
        for name in self.variants:
            recipe = self.variant(name)
            if all(getattr(recipe.weights, term) == 0 for term in recipe.knowledge):
                where = "distill.knowledge" if not self.variants[name].knowledge else f"variants.{name}.knowledge"
                term = recipe.knowledge[0]
                raise ValueError(f"distill.weights.{term}={getattr(recipe.weights, term)}: every term of {where} "
                                 f"{list(recipe.knowledge)} has weight 0 (nothing to learn); one must be > 0")
        return self

    @model_validator(mode="after")
    def _batches_fit(self):
        """Budgets that only fail once training starts: the effective batch must split into ``batch_size`` x
        processes (``fabric.devices x fabric.num_nodes``); retrieval draws ``train.retrieval_negatives`` hard
        negatives from the other examples of each forward batch."""
        world = self.fabric.devices * self.fabric.num_nodes
        budgets = [(self, stage, None, [f"train.{stage}"]) for stage in ("teacher_pretrain", "distill_pretrain")]
        budgets += [(self, stage, task, [f"train.{stage}_tasks.{task}", f"train.{stage}"])
                    for stage in PER_TASK_STAGES for task in self.tasks]
        for params, stage, task, keys in budgets:
            layers = [self._budget_layer(key) for key in keys]

            def origin(field: str) -> str:  # the first layer (per task, stage) that sets ``field``
                return next(key for key, layer in zip(keys, layers, strict=True)
                            if layer is not None and field in layer.model_fields_set or key == keys[-1])

            budget = params.budget(stage, task)
            if budget.effective_batch and budget.effective_batch % (budget.batch_size * world):
                raise ValueError(f"{origin('effective_batch')}.effective_batch={budget.effective_batch}: must be a "
                                 f"multiple of batch_size x fabric.devices x fabric.num_nodes = {budget.batch_size} x "
                                 f"{self.fabric.devices} x {self.fabric.num_nodes}")
            if task == "retrieval" and self.train.retrieval_negatives >= budget.batch_size:
                raise ValueError(f"train.retrieval_negatives={self.train.retrieval_negatives}: must be < "
                                 f"{origin('batch_size')}.batch_size={budget.batch_size} (retrieval's hard negatives "
                                 "are other examples of the same batch)")
        return self

    def _budget_layer(self, key: str) -> BaseModel | None:
        """The budget object a dotted key names: ``train.<stage>``, ``train.<stage>_tasks.<task>`` (None when that
        task has no override)."""
        parts = key.split(".")
        if len(parts) == 2:
            return getattr(self.train, parts[1])
        return getattr(self.train, parts[1]).get(parts[2])

    def budget(self, stage: str, task: str | None = None) -> StageBudget:
        """The budget of ``stage`` (``train.<stage>``), with ``train.<stage>_tasks.<task>`` applied when set."""
        if stage not in TrainParams.model_fields or not isinstance(getattr(self.train, stage), StageBudget):
            raise ConfigError(f"train.{stage}: no such training stage")
        override = getattr(self.train, f"{stage}_tasks", {}).get(task)
        return getattr(self.train, stage) if override is None else override.resolve(getattr(self.train, stage))

    def student_kind(self, variant: str) -> str:
        """``dual`` or ``fusion``: the variant's own ``student`` or else ``student.kind``."""
        return self.variants[variant].student or self.student.kind

    def task_variants(self, task: str) -> list[str]:
        """The variants ``runs`` trains on ``task``, in the order of ``runs``."""
        return [run.variant for run in self.runs.values() if run.task == task]

    @property
    def lead_seed(self) -> int:
        """The first seed of ``seeds``: its replica stands for a variant where one model is needed (re-ranking
        candidates, the attention figure, exports, latency) and it seeds the process of each run."""
        return self.seeds[0]

    def task_models(self, task: str) -> list[str]:
        """The students ``runs`` trains on ``task``: one model ``<variant>_seed<k>`` per variant and seed of
        ``seeds``, variant by variant in the order of ``runs``."""
        return [replica_name(variant, seed) for variant in self.task_variants(task) for seed in self.seeds]


# ------------------------------------------------------------------------------------------------------ loading
def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """Describe what may stand at ``loc`` (keys of the enclosing section) for an unknown-key error."""
    node: Any = model
    mapping = False
    for part in loc[:-1]:
        if mapping:  # ``part`` is a key of a mapping whose values are ``node``
            mapping = False
            continue
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return ""
        node = fields[part].annotation
        mapping = typing.get_origin(node) is dict
        for arg in typing.get_args(node) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                node = arg
    fields = getattr(node, "model_fields", None)
    return f"allowed keys: {', '.join(fields)}" if fields else ""


def _shown(value: Any) -> str:
    """A value as the one-line errors show it: JSON for scalars (``"lasst"``, ``-1``, ``null``), else ``repr``."""
    shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


_NAMED = re.compile(r"^([\w.\-\[\]]+)(=.+?)?: (.*)$")
"""A validator message that names its (dotted) key: ``key=value: what is allowed`` or ``key: what is wrong``."""


def _one_line(err: ValidationError, source: str) -> str:
    """Turn pydantic's first error into: ``<source>: <dotted.key>=<value>: <what is allowed>``.

    Section-level checks (model validators) name their key in the message, relative to the section that failed
    (``min_objects=5: ...`` in ``data.scene``); a message that names no key is shown after the section's key."""
    first = err.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    # drop pydantic's internal union/validator tags (e.g. 'function-after[...]', 'literal[...]', 'Nlvr2Data')
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p[:1].isupper())))
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<top level>"
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' ({_allowed(Params, loc)})"
    if first["type"] == "missing":
        return f"{source}: {key} is required"
    message = first["msg"].removeprefix("Value error, ")
    named = _NAMED.match(message) if first["type"] == "value_error" else None
    if named:
        name = named.group(1)
        # a field validator names its own field (``seeds=...`` at ``seeds``): do not repeat it
        full = key if not loc or key == name or key.endswith("." + name) else f"{key}.{name}"
        full = name if not loc else full
        return f"{source}: {full}{named.group(2) or ''}: {named.group(3)}"
    if not loc:  # a whole-file check whose message names no key: never dump the whole params
        return f"{source}: {message}"
    return f"{source}: {key}={_shown(value)}: {message}"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does: ``1e-4`` (no dot) is the number 0.0001, not the string
    that YAML 1.1 makes of it. DVC's own parser (``dvc exp run -S``) already reads it that way."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _apply_override(raw: dict, override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``raw``."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, text = override.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.load(text, Loader=_Loader)


def load(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read, override and validate a params file. Raises :class:`ConfigError` with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, str(path))) from None


def load_or_exit(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """:func:`load` for stage entry points: print the one-line error to stderr and exit with status 2."""
    try:
        return load(path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a params (sub-)object into dotted keys, as logged to MLflow: ``{'train.lr': 0.001, ...}``."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out
