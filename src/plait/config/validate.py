"""One home for the rules a run's settings must obey: each value's range and every rule that
joins two sections (a loss and a model kind, a regulariser and the evaluated features, ...).

- :func:`validate` (``plait train``, before anything is built or written): every rule that needs
  only the config; what a component accepts as options (an encoder's sizes, a loss's arguments,
  an augmentation's options) is the component's own check, through its registry.
- :func:`validate_eval` (``plait eval``, and the ``eval`` part of :func:`validate`).
- :func:`validate_with_data` (once the training set is read): the rules that need its size, its
  label sets, the number of processes and the device.

Every refusal is one ValueError naming the key and the value. Model and loss capabilities are
read from their classes' declarations (``plait.models.contract``, ``plait.losses.base``), never
from a kind name.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from plait._checks import check_int, is_int, is_number

NONFINITE_POLICIES = ("stop", "skip")
SPLITS = ("test", "validation")


def refuse(key: str, value, wanted: str) -> None:
    """Raise ``key=value is not valid: wanted``."""
    raise ValueError(f"{key}={value!r} is not valid: {wanted}")


def validate(config: DictConfig) -> None:
    """Every rule on ``config`` that needs no data: the optimiser's and the loop's values, the
    evaluation's, and the rules across sections. A ValueError names the key and the value."""
    _validate_optim(config.optim)
    _validate_train(config.train)
    validate_eval(config)
    _validate_model_and_objective(config)


def _validate_optim(optim: DictConfig) -> None:
    check_int("optim.epochs", optim.epochs, minimum=1)
    check_int("optim.steps", optim.steps, minimum=1, allow_none=True, note=" (or null: optim.epochs sets the schedule)")
    check_int("optim.max_steps", optim.max_steps, minimum=1, allow_none=True, note=" (or null: no limit)")
    if not (math.isfinite(optim.lr) and optim.lr > 0):
        refuse("optim.lr", optim.lr, "it must be a positive number")
    if not 0.0 <= optim.warmup_fraction < 1.0:
        refuse("optim.warmup_fraction", optim.warmup_fraction, "it must be in [0, 1)")
    if optim.grad_clip is not None and not (math.isfinite(optim.grad_clip) and optim.grad_clip >= 0):
        refuse("optim.grad_clip", optim.grad_clip, "it must be >= 0 (0 or null: no clipping)")


def _validate_train(train: DictConfig) -> None:
    check_int("train.log_every", train.log_every, minimum=1)
    for key in ("eval_every_epochs", "staleness_every_epochs", "checkpoint_every_epochs", "checkpoint_every_steps"):
        check_int(f"train.{key}", train[key], minimum=0, rule=">= 0", note=" (0: never)")
    if train.on_nonfinite not in NONFINITE_POLICIES:
        refuse("train.on_nonfinite", train.on_nonfinite, f"valid: {', '.join(NONFINITE_POLICIES)}")
    timeout = train.dist_timeout_s
    if not (is_number(timeout) and math.isfinite(timeout) and timeout > 0):
        refuse("train.dist_timeout_s", timeout, "it must be a positive number of seconds")
    check_int("train.grad_cache_chunk", train.grad_cache_chunk, minimum=0, note=" (0: off)")
    if not 0.0 <= float(train.bank_momentum) < 1.0:
        raise ValueError(f"train.bank_momentum must be in [0, 1), got {train.bank_momentum}")


def validate_eval(config: DictConfig) -> None:
    """The ``eval`` section's values (``plait train`` before anything is written, ``plait eval``
    before anything is read): a ValueError naming the key and the value."""
    from plait.evaluate.suite import EVALUATORS, FEATURES

    evaluation = config.eval
    unknown = [task for task in evaluation.tasks if task not in EVALUATORS]
    if unknown:
        raise ValueError(f"eval.tasks has unknown task(s) {', '.join(map(repr, unknown))}; valid: {', '.join(EVALUATORS)}")
    if evaluation.split not in SPLITS:
        raise ValueError(f"eval.split must be 'test' or 'validation', got {evaluation.split!r}")
    if evaluation.split == "validation" and not config.data.validation_fraction:
        raise ValueError("eval.split=validation needs data.validation_fraction > 0")
    if evaluation.features not in FEATURES:
        refuse("eval.features", evaluation.features, f"valid: {', '.join(FEATURES)}")
    check_int("eval.batch_size", evaluation.batch_size, minimum=1)
    check_int("eval.gallery", evaluation.gallery, minimum=0, rule=">= 0", note=" (the number of gallery queries; 0: none)")
    shots = list(evaluation.few_shot)
    if not all(is_int(k) and k >= 1 for k in shots):
        refuse("eval.few_shot", shots, "it must be a list of positive integers (shots per class)")
    check_int("eval.few_shot_seeds", evaluation.few_shot_seeds, minimum=1)


def _validate_model_and_objective(config: DictConfig) -> None:
    """The rules between the model kind, the loss, the regularisers and the loop's options."""
    from plait.losses.objective import MODEL_ITC, reads_independent
    from plait.losses.regularizers import REGULARIZERS
    from plait.models import MODEL_KINDS, model_class

    model = model_class(OmegaConf.to_container(config.model, resolve=True))
    if config.loss.name == MODEL_ITC:
        if not model.own_contrastive_term:
            kinds = " or ".join(f"model.kind={kind}" for kind, cls in MODEL_KINDS.items() if cls.own_contrastive_term)
            raise ValueError(f"loss.name={MODEL_ITC} is the fusion model's own ITC; it needs {kinds}")
        if config.loss.options:
            raise ValueError(f"loss.name={MODEL_ITC} takes no loss.options "
                             "(its settings are model.fusion's: alpha, queue_size, ...)")
        if config.loss.in_modal:
            raise ValueError(f"loss.in_modal needs a base loss; loss.name={MODEL_ITC} has none")
    if config.train.grad_cache_chunk and not model.supports_grad_cache:
        raise ValueError("train.grad_cache_chunk is for two-tower models: the fusion model's ITM and MLM are not "
                         "functions of the contrastive features alone")
    if config.train.bank_momentum and not model.accepts_bank_features:
        raise ValueError("train.bank_momentum is for two-tower models; a fusion model has its own momentum encoders "
                         "(model.fusion.momentum)")
    names = [spec.get("name") if isinstance(spec, DictConfig) else None for spec in config.regularizers]
    if config.eval.features != "shared" and not reads_independent([REGULARIZERS.get(n) for n in names if n in REGULARIZERS]):
        raise ValueError(f"eval.features={config.eval.features!r} needs a model with independent heads, which only a "
                         "separation regularizer gives (regularizers=[{name: separation, ...}]); use eval.features=shared")


def validate_with_data(config: DictConfig, train_set, device) -> None:
    """The rules that need the training set (``len``, ``labels``), the number of processes and the
    resolved device: a ValueError naming the key."""
    from plait.distributed import local_batch_size, world_size
    from plait.models import model_class

    batch_size = config.data.batch_size  # the global batch: B / world_size rows per rank
    if not 2 <= batch_size <= len(train_set):
        raise ValueError(f"data.batch_size={batch_size} must be in [2, {len(train_set)}] (the training set size)")
    local, processes = local_batch_size(batch_size), world_size()  # refused unless the processes share it evenly
    rows = model_class(OmegaConf.to_container(config.model, resolve=True)).min_rows_per_process
    if processes > 1 and local < rows:
        raise ValueError(f"data.batch_size={batch_size} gives {local} row per process; the {config.model.kind} model needs at "
                         f"least {rows} per process (ITM draws its negatives from them): use at least {rows * processes}")
    if processes > 1 and device.type == "cuda" and str(config.train.device).startswith("cuda:"):
        raise ValueError(f"train.device={config.train.device} would put every rank on one GPU; under torchrun each rank "
                         "takes the GPU of its LOCAL_RANK: use train.device=cuda or auto")
    label = config.eval.label
    if label is not None and label not in train_set.labels:
        have = ", ".join(sorted(train_set.labels)) or "none (this dataset has no label sets)"
        raise ValueError(f"eval.label={label!r} is not a label set of the {config.data.name} data; valid: {have}")


def validate_finetune(config: DictConfig) -> None:
    """``plait finetune``'s settings (``FinetuneConfig``): a ValueError naming the key."""
    for key in ("batch_size", "epochs"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or null, got {config.max_steps}")
    if not (math.isfinite(config.lr) and config.lr > 0):  # an infinite lr is refused too
        raise ValueError(f"lr must be positive, got {config.lr}")
    if not 0 <= config.validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {config.validation_fraction}")
