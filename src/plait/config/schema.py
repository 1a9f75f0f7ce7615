"""The run configuration's schema: typed sections with their defaults, and what each key means
for a resume and for a result, declared on the field.

Field metadata (read by :func:`keys_with` and the constants below, never kept as lists elsewhere):

- ``resume``: what a ``--resume`` may change. ``FIXED`` (the default): the training problem,
  refused when it differs; ``FREE``: what is logged, saved, evaluated or where the run executes;
  ``SCHEDULE``: ``optim.epochs`` / ``optim.steps``, as long as the lr schedule keeps its length;
  ``DTYPE``: ``train.precision``, as long as it resolves to the autocast dtype the run trained in.
  A free-form option block declares its keys by role: ``free_options`` (may always change:
  ``data.options.cache_dir``), ``location_options`` (where the data live: may change when the
  checkpoint's data fingerprint proves the data the same).
- ``results``: False for a setting that changes how a run waits, shows or logs, never what it
  computes (an experiment may reuse a run that differs only there).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional

FIXED, FREE, SCHEDULE, DTYPE = "fixed", "free", "schedule", "dtype"


def setting(default: Any = MISSING, *, factory: Any = MISSING, resume: str = FIXED, results: bool = True, **extra):
    """A schema field with its resume policy and whether it can change a result."""
    return field(default=default, default_factory=factory, metadata={"resume": resume, "results": results, **extra})


@dataclass
class AugmentConfig:
    """Whether the training view of each modality is augmented. Regularisers and in-modal terms
    also need a second, augmented view, which always uses the modality's augmentation."""

    image: bool = False
    text: bool = False
    vector: bool = False
    image_options: dict[str, Any] = field(default_factory=dict)
    text_options: dict[str, Any] = field(default_factory=dict)
    vector_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """The ``data`` section: the dataset (a registered name and its options), the batch size, an
    optional validation carve, DataLoader workers and each modality's augmentation."""

    name: str = "emoji"
    options: dict[str, Any] = setting(factory=dict, free_options=("cache_dir",), location_options=("path", "test_path"))
    batch_size: int = 32
    # > 0: carve this fraction of the training split (by group) as a validation split; training
    # uses the rest, per-epoch evaluations use it, and eval.split may name it for the final one.
    validation_fraction: float = 0.0
    num_workers: int = setting(0, resume=FREE)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """The ``model`` section: the model kind, each tower's encoder spec, the shared embedding
    width, the (learnable) temperature and an optional projection hidden layer."""

    # two_tower (CLIP-style: a, b, embed_dim, ...) | fusion (ALBEF-style: the options in `fusion`,
    # e.g. {preset: tiny, queue_size: 1024}, see plait.models.fusion.FusionModel; embed_dim and
    # init_temperature apply too)
    kind: str = "two_tower"
    fusion: dict[str, Any] = field(default_factory=dict)
    # Encoder specs {name: ..., **options}; empty: chosen by the view's modality (see build_model).
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 128
    init_temperature: float = 0.07
    learn_temperature: bool = True
    projection_hidden: int = 0


@dataclass
class LossConfig:
    """The ``loss`` section: the contrastive loss by registered name, its options, and whether
    in-modal terms (each view against its augmented view) join the cross-modal ones."""

    name: str = "gamma"
    options: dict[str, Any] = field(default_factory=dict)
    in_modal: bool = False  # L_Con = 1/4 (V2T + T2V + V2V + T2T) with augmented views


@dataclass
class OptimConfig:
    """The ``optim`` section: AdamW's settings, the budget (epochs, or optimizer steps), the
    warm-up fraction of the warm-up + cosine lr schedule and gradient-norm clipping."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    epochs: int = setting(20, resume=SCHEDULE)
    # a budget in optimizer steps instead of epochs: the schedule spans this many steps, over as
    # many epochs as it takes (equal-step comparisons across batch sizes)
    steps: Optional[int] = setting(None, resume=SCHEDULE)
    max_steps: Optional[int] = setting(None, resume=FREE)  # stop early after this many steps (tests, quick runs)
    warmup_fraction: float = 0.05
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainConfig:
    """The ``train`` section: device and precision, logging, checkpointing and periodic
    evaluation, the bank's momentum encoder, the non-finite policy, GradCache and torchrun."""

    device: str = setting("auto", resume=FREE)  # auto | cpu | cuda | cuda:N
    # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | fp64 (parameters and inputs) | bf16 | fp16
    precision: str = setting("auto", resume=DTYPE)
    deterministic: bool = setting(False, resume=FREE)
    log_every: int = setting(10, resume=FREE)
    eval_every_epochs: int = setting(0, resume=FREE)  # 0: evaluate only at the end (on the validation split if there is one)
    # per-sample losses: log the state's error against a frozen snapshot (0: never)
    staleness_every_epochs: int = setting(1, resume=FREE)
    # > 0: a momentum copy of the model (weight m on the old copy per step, as MoCo) encodes each
    # batch for the gamma loss's memory bank, so bank rows come from one slowly moving encoder
    bank_momentum: float = 0.0
    checkpoint_every_epochs: int = setting(1, resume=FREE)
    checkpoint_every_steps: int = setting(0, resume=FREE)
    tensorboard: bool = setting(False, resume=FREE, results=False)
    progress: bool = setting(True, resume=FREE, results=False)
    # a non-finite loss or gradient norm (or a feature row with no direction): stop (raise, naming
    # the step, the batch and the last good checkpoint) | skip (no optimizer step; the schedule and
    # the data position still advance; 20 consecutive skips stop the run)
    on_nonfinite: str = setting("stop", resume=FREE)
    # > 0: GradCache: the encoders run in chunks of this many rows, twice (features without
    # gradient, then recomputed with the loss's cached feature gradients): one chunk's activations
    grad_cache_chunk: int = setting(0, resume=FREE)
    # torchrun: how long a collective waits for the other ranks before the job stops (a dead or
    # stuck peer; torchrun's agent stops the job first when a rank exits with an error)
    dist_timeout_s: float = setting(1800.0, resume=FREE, results=False)


@dataclass
class EvalConfig:
    """The ``eval`` section: the evaluation tasks, the split, the label set and the few-shot
    protocol of the probes, the encoding batch size, the gallery size and the probed features."""

    tasks: list[str] = field(default_factory=lambda: ["retrieval", "zero_shot", "linear_probe", "knn"])
    split: str = "test"  # the final evaluation's split: test | validation (needs data.validation_fraction)
    label: Optional[str] = None  # label set for zero-shot / probes (default: the dataset's first)
    few_shot: list[int] = field(default_factory=lambda: [1, 5, 10])
    few_shot_seeds: int = 3
    batch_size: int = 256
    gallery: int = 8
    features: str = "shared"  # probes on the shared, independent or both ([z, z^i]) features


@dataclass
class RunConfig:
    """A whole run: its name, seed and output directory, and the data, model, loss, regulariser,
    optimiser, training and evaluation sections."""

    name: str = setting("run", resume=FREE)
    seed: int = 0
    output_dir: str = setting("runs/${name}", resume=FREE)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # e.g. [{name: bridge, weight: 0.1, t: 0.25}, {name: consistency, weight: 0.5}]
    regularizers: list[dict[str, Any]] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = setting(factory=EvalConfig, resume=FREE)  # the whole section: what is evaluated


def keys_with(predicate, schema: type = RunConfig, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of ``schema``'s fields whose metadata satisfy ``predicate`` (a section that
    satisfies it is named whole, not its keys)."""
    keys = []
    for item in fields(schema):
        key = f"{prefix}{item.name}"
        if predicate(item.metadata):
            keys.append(key)
        elif _section(item):
            keys.extend(keys_with(predicate, _section(item), key + "."))
    return tuple(keys)


def _section(item) -> type | None:
    """The dataclass of a section field (its default factory), or None for a value field."""
    factory = item.default_factory
    return factory if isinstance(factory, type) and is_dataclass(factory) else None


def option_keys_with(role: str, schema: type = RunConfig, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys inside free-form option blocks declared with ``role`` (``free_options``,
    ``location_options``)."""
    keys = []
    for item in fields(schema):
        key = f"{prefix}{item.name}"
        keys.extend(f"{key}.{option}" for option in item.metadata.get(role, ()))
        if _section(item):
            keys.extend(option_keys_with(role, _section(item), key + "."))
    return tuple(keys)


# What a resume may change (plait.training.resume), and what cannot change a result (experiments).
RESUME_MAY_CHANGE = keys_with(lambda meta: meta.get("resume") == FREE)
SCHEDULE_KEYS = keys_with(lambda meta: meta.get("resume") == SCHEDULE)
DTYPE_KEYS = keys_with(lambda meta: meta.get("resume") == DTYPE)
ALWAYS_MAY_CHANGE = (*option_keys_with("free_options"), *DTYPE_KEYS)
DATA_LOCATION = option_keys_with("location_options")
NO_EFFECT = keys_with(lambda meta: meta.get("results") is False)


@dataclass
class FinetuneConfig:
    """``plait finetune``'s settings (a fusion backbone and a task head on an emoji task)."""

    task: str = "vqa"
    seed: int = 0
    output_dir: str = ""  # default: beside the weights, finetune-TASK
    task_options: dict[str, Any] = field(default_factory=dict)  # EmojiVQA / EmojiReasoning / EmojiEntailment options
    validation_fraction: float = 0.1
    batch_size: int = 32
    epochs: int = 5
    max_steps: Optional[int] = None
    lr: float = 1e-4
    head_lr_multiplier: float = 10.0  # the fresh head learns faster than the pre-trained backbone
    weight_decay: float = 0.02
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_batch_size: int = 128
    device: str = "auto"
