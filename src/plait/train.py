"""The trainer: one loop for every loss, model and dataset of a config.

    plait train configs/emoji.yaml data.batch_size=32 [--resume]

Each step: a batch (index, view_a, view_b) in a resumable seeded order (``plait.data.sampler``)
-> augmentation -> ``model.training_step(Batch, objective)`` (the model contract,
``plait.models.contract``: two-tower and fusion models alike) -> AdamW with warm-up + cosine
schedule (``plait.optim``) and gradient clipping -> ``model.after_optimizer_step()``. Logs go to
``metrics.jsonl`` (and TensorBoard if asked), evaluations to ``eval.json``, checkpoints to
``checkpoint.pt`` (atomic), final weights to ``model.safetensors``; which files are a run's is
``plait.run_dir``, what a resume may change ``plait.resume``.

Faults and bad input: settings are checked before anything is built or written; a run never
replaces another's files (``--resume`` or ``--overwrite``); a resume with changed settings or
other data is refused; a non-finite loss or gradient stops the run (or skips the step,
``train.on_nonfinite``) and a model with non-finite parameters is never saved.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import random
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from plait import distributed, runtime
from plait.atomic import WriteError, atomic_write_text, display_path, temp_files
from plait.checkpoint import export_weights, load_checkpoint, save_checkpoint
from plait.config import _first_line, from_yaml, to_yaml
from plait.data.sampler import EpochSampler
from plait.models.contract import Batch, ObjectiveError
from plait.optim import parameter_groups, warmup_cosine
from plait.resume import (ALWAYS_MAY_CHANGE, DATA_LOCATION, RESUME_MAY_CHANGE, _precision_name, _saved_autocast,
                          _show, config_differences, data_fingerprint)
from plait.run_dir import check_run_dir, remove_outputs

NONFINITE_POLICIES = ("stop", "skip")
MAX_CONSECUTIVE_SKIPS = 20  # train.on_nonfinite=skip stops anyway after this many skipped steps in a row
RANK_SEED_STRIDE = 10_007  # under torchrun rank r's random draws (augmentation, dropout) start from seed + r * this


def build_base_loss(config: DictConfig, dataset_size: int, seed: int) -> nn.Module:
    """The config's loss, with ``dataset_size`` and ``seed`` filled in where it takes them."""
    from plait.losses import build_loss

    options = OmegaConf.to_container(config.loss.options, resolve=True) or {}
    return build_loss(config.loss.name, fill={"dataset_size": dataset_size, "seed": seed}, **options)


MODEL_ITC = "momentum_itc"  # loss.name of the fusion model's own ITC (momentum distillation over batch + queue)


def build_objective(config: DictConfig, dataset_size: int) -> nn.Module:
    """Base loss (+ in-modal terms with their own state) + the config's regularisers. ``loss.name:
    momentum_itc`` has no base: the model computes its own contrastive term (the fusion model's ITC)."""
    from plait.losses.objective import ContrastiveObjective, build_regularizer

    regularizers = [build_regularizer(OmegaConf.to_container(spec, resolve=True), seed=config.seed) for spec in config.regularizers]
    if config.loss.name == MODEL_ITC:
        if config.model.kind != "fusion":
            raise ValueError(f"loss.name={MODEL_ITC} is the fusion model's own ITC; it needs model.kind=fusion")
        if config.loss.options:
            raise ValueError(f"loss.name={MODEL_ITC} takes no loss.options (its settings are model.fusion's: alpha, queue_size, ...)")
        if config.loss.in_modal:
            raise ValueError(f"loss.in_modal needs a base loss; loss.name={MODEL_ITC} has none")
        return ContrastiveObjective(None, None, regularizers)
    base = build_base_loss(config, dataset_size, config.seed)
    in_modal = None
    if config.loss.in_modal:
        in_modal = (build_base_loss(config, dataset_size, config.seed + 1), build_base_loss(config, dataset_size, config.seed + 2))
    return ContrastiveObjective(base, in_modal, regularizers)


def check_settings(config: DictConfig) -> None:
    """Refuse values that would fail (or silently misbehave) only later in a run; a ValueError names
    the key and the value. Checks that need the data (batch size, eval.label) are in ``Trainer``."""
    optim, train_ = config.optim, config.train

    def refuse(key: str, value, wanted: str) -> None:
        raise ValueError(f"{key}={value!r} is not valid: {wanted}")

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not (integer(optim.epochs) and optim.epochs >= 1):
        refuse("optim.epochs", optim.epochs, "it must be a positive integer")
    if optim.steps is not None and not (integer(optim.steps) and optim.steps >= 1):
        refuse("optim.steps", optim.steps, "it must be a positive integer (or null: optim.epochs sets the schedule)")
    if optim.max_steps is not None and not (integer(optim.max_steps) and optim.max_steps >= 1):
        refuse("optim.max_steps", optim.max_steps, "it must be a positive integer (or null: no limit)")
    if not (math.isfinite(optim.lr) and optim.lr > 0):
        refuse("optim.lr", optim.lr, "it must be a positive number")
    if not 0.0 <= optim.warmup_fraction < 1.0:
        refuse("optim.warmup_fraction", optim.warmup_fraction, "it must be in [0, 1)")
    if optim.grad_clip is not None and not (math.isfinite(optim.grad_clip) and optim.grad_clip >= 0):
        refuse("optim.grad_clip", optim.grad_clip, "it must be >= 0 (0 or null: no clipping)")
    if not (integer(train_.log_every) and train_.log_every >= 1):
        refuse("train.log_every", train_.log_every, "it must be a positive integer")
    for key in ("eval_every_epochs", "staleness_every_epochs", "checkpoint_every_epochs", "checkpoint_every_steps"):
        if train_[key] < 0:
            refuse(f"train.{key}", train_[key], "it must be >= 0 (0: never)")
    if train_.on_nonfinite not in NONFINITE_POLICIES:
        refuse("train.on_nonfinite", train_.on_nonfinite, f"valid: {', '.join(NONFINITE_POLICIES)}")
    if not (isinstance(train_.dist_timeout_s, (int, float)) and math.isfinite(train_.dist_timeout_s) and train_.dist_timeout_s > 0):
        refuse("train.dist_timeout_s", train_.dist_timeout_s, "it must be a positive number of seconds")
    check_eval_settings(config)


def check_eval_settings(config: DictConfig) -> None:
    """The ``eval`` section's values (``plait train`` before anything is written, ``plait eval``
    before anything is read): a ValueError naming the key and the value."""
    from plait.evaluate.suite import FEATURES, TASKS

    evaluation = config.eval

    def refuse(key: str, value, wanted: str) -> None:
        raise ValueError(f"{key}={value!r} is not valid: {wanted}")

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    unknown = [task for task in evaluation.tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"eval.tasks has unknown task(s) {', '.join(map(repr, unknown))}; valid: {', '.join(TASKS)}")
    if evaluation.split not in ("test", "validation"):
        raise ValueError(f"eval.split must be 'test' or 'validation', got {evaluation.split!r}")
    if evaluation.split == "validation" and not config.data.validation_fraction:
        raise ValueError("eval.split=validation needs data.validation_fraction > 0")
    if evaluation.features not in FEATURES:
        refuse("eval.features", evaluation.features, f"valid: {', '.join(FEATURES)}")
    if not (integer(evaluation.batch_size) and evaluation.batch_size >= 1):
        refuse("eval.batch_size", evaluation.batch_size, "it must be a positive integer")
    if not (integer(evaluation.gallery) and evaluation.gallery >= 0):
        refuse("eval.gallery", evaluation.gallery, "it must be >= 0 (the number of gallery queries; 0: none)")
    shots = list(evaluation.few_shot)
    if not all(integer(k) and k >= 1 for k in shots):
        refuse("eval.few_shot", shots, "it must be a list of positive integers (shots per class)")
    if not (integer(evaluation.few_shot_seeds) and evaluation.few_shot_seeds >= 1):
        refuse("eval.few_shot_seeds", evaluation.few_shot_seeds, "it must be a positive integer")


def _nonfinite_tensor(*modules: nn.Module | None) -> str | None:
    """The name of the first floating-point parameter or buffer of ``modules`` holding a NaN or an
    infinity, or None."""
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
    return None


def _degenerate_features(features, index: torch.Tensor) -> str | None:
    """Which item's features in a batch are non-finite or all zero (no direction to normalise), or None.
    (Gathered features, under torchrun, carry the global batch's indices.)"""
    if torch.is_tensor(getattr(features, "index", None)):
        index = features.index
    for name, z in vars(features).items():
        if not (torch.is_tensor(z) and z.dim() == 2 and z.shape[0] == len(index)):
            continue
        for rows, what in ((~torch.isfinite(z).all(dim=1), "non-finite"), ((z == 0).all(dim=1), "all-zero")):
            if bool(rows.any()):
                items = index[rows].tolist()
                shown = ", ".join(map(str, items[:4])) + (", ..." if len(items) > 4 else "")
                return f"{what} features ({name}) of item(s) {shown}"
    return None


def _finite_or_none(record: dict) -> dict:
    """A metrics record with non-finite floats as null: strict JSON (``NaN`` is not JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class Trainer:
    """Builds everything a config names and runs (or resumes) it."""

    def __init__(self, config: DictConfig, run_dir: str | Path | None = None, allow_import: bool = False):
        """``allow_import``: encoders named ``package.module:Class`` may be imported (the command
        line's ``--allow-import``); otherwise only built-in encoders are accepted."""
        from plait.data import build_dataset
        from plait.models import build_model, input_spec

        self.allow_import = allow_import
        self.config = config
        self.run_dir = Path(run_dir or config.output_dir)  # nothing is written into it before fit()
        check_settings(config)
        self.device = distributed.device_for_rank(runtime.select_device(config.train.device))
        self.amp_dtype = runtime.autocast_dtype(config.train.precision, self.device)
        self.param_dtype = runtime.parameter_dtype(config.train.precision)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = distributed.is_main()  # rank 0 alone writes files (plait.distributed)
        runtime.seed_everything(config.seed, config.train.deterministic)  # the same on every rank: the same model

        options = OmegaConf.to_container(config.data.options, resolve=True) or {}
        self.train_set = build_dataset(config.data.name, split="train", **options)
        self.test_set = build_dataset(config.data.name, split="test", **options)
        # a library imported lazily by a reader may draw from Python's RNG (sklearn -> rich does):
        # reseed it, so every trainer of a config starts from the same state, first in a process or not
        random.seed(config.seed)
        self._write_skipped = getattr(self.train_set, "write_skipped", None)  # skipped_rows.json, at fit()
        self.validation_set = None
        if config.data.validation_fraction:
            from plait.data import carve_validation

            # seed 0, not config.seed: every training seed sees the same validation split
            self.train_set, self.validation_set = carve_validation(self.train_set, config.data.validation_fraction, seed=0)
        batch_size = config.data.batch_size  # the global batch: B / world_size rows per rank
        if not 2 <= batch_size <= len(self.train_set):
            raise ValueError(f"data.batch_size={batch_size} must be in [2, {len(self.train_set)}] (the training set size)")
        local_batch = distributed.local_batch_size(batch_size)
        if self.world_size > 1 and config.model.kind == "fusion" and local_batch < 2:
            raise ValueError(f"data.batch_size={batch_size} gives {local_batch} row per process; the fusion model needs at "
                             f"least 2 per process (ITM draws its negatives from them): use at least {2 * self.world_size}")
        if self.world_size > 1 and self.device.type == "cuda" and str(config.train.device).startswith("cuda:"):
            raise ValueError(f"train.device={config.train.device} would put every rank on one GPU; under torchrun each rank "
                             "takes the GPU of its LOCAL_RANK: use train.device=cuda or auto")
        chunk = config.train.grad_cache_chunk
        if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0):
            raise ValueError(f"train.grad_cache_chunk={chunk!r} is not valid: it must be an integer >= 0 (0: off)")
        if chunk and config.model.kind == "fusion":
            raise ValueError("train.grad_cache_chunk is for two-tower models: the fusion model's ITM and MLM are not "
                             "functions of the contrastive features alone")
        label = config.eval.label
        if label is not None and label not in self.train_set.labels:
            have = ", ".join(sorted(self.train_set.labels)) or "none (this dataset has no label sets)"
            raise ValueError(f"eval.label={label!r} is not a label set of the {config.data.name} data; valid: {have}")

        self.loss_fn = build_objective(config, len(self.train_set)).to(self.device)
        if config.eval.features != "shared" and not self.loss_fn.needs_independent:
            raise ValueError(f"eval.features={config.eval.features!r} needs a model with independent heads, which only a "
                             "separation regularizer gives (regularizers=[{name: separation, ...}]); use eval.features=shared")
        self.inputs = input_spec(self.train_set)  # stored with the weights: a saved model is rebuilt without its data
        spec = OmegaConf.to_container(config.model, resolve=True)
        if spec.get("kind") == "fusion":  # the model's own draws (MLM masks, hard negatives) follow the run's seed
            # (and the rank's: each rank masks and draws negatives for its own rows)
            spec["fusion"] = {"seed": config.seed + RANK_SEED_STRIDE * self.rank, **(spec.get("fusion") or {})}
        self.model = build_model(spec, self.inputs, independent=self.loss_fn.needs_independent,
                                 allow_import=allow_import).to(self.device)
        if self.param_dtype is not None:
            self.model.to(self.param_dtype)
            self.loss_fn.to(self.param_dtype)
        self._sync_batch_norm()
        self.momentum_model = self._momentum_copy()
        # under DDP the model's training step is the wrapped forward (one step, one feature path)
        self.step_module = distributed.wrap(distributed.TrainingStep(self.model), self.device)
        if self.world_size > 1:  # each rank's own dropout draws (the model itself is rank 0's: DDP broadcast it)
            runtime.seed_everything(config.seed + RANK_SEED_STRIDE * self.rank, config.train.deterministic)
        self.sampler = EpochSampler(len(self.train_set), config.seed, self.rank, self.world_size, batch_size)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=local_batch, sampler=self.sampler, drop_last=True,
            num_workers=config.data.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG out of the data order
        )
        self.steps_per_epoch = len(self.train_set) // batch_size
        self.schedule_steps = schedule = self._schedule_length(config)
        self.total_steps = min(schedule, config.optim.max_steps or schedule)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.model, config.optim.weight_decay), lr=config.optim.lr,
            betas=tuple(config.optim.betas), eps=config.optim.eps, fused=self.device.type in ("cpu", "cuda"),
        )  # the fused kernel: 4x faster than the loop on a 2M-row embedding table (CPU)
        warmup = max(1, int(config.optim.warmup_fraction * schedule))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(schedule, warmup))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.augment = {side: self._augmenter(side) for side in ("a", "b")}
        # per-step settings as plain Python values: an OmegaConf lookup costs ~10 us, a step of a small model ~1 ms
        self._augment_views = tuple(bool(config.data.augment[m]) for m in self.train_set.modalities)
        self._grad_clip = float(config.optim.grad_clip or 0.0)
        self._skip_nonfinite = config.train.on_nonfinite == "skip"
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skipped_steps, self.consecutive_skips = 0, 0  # train.on_nonfinite=skip
        self.terms: dict = {}  # the named loss terms of the last step (model contract)
        self._window_losses: list[torch.Tensor] = []  # losses of the steps since the last log line
        self._window_samples = 0
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, step) of the latest save or resume
        self._resumed = False
        self._resumed_from: bool | Path = False  # True: output_dir/checkpoint.pt; a Path: the checkpoint given
        self.metrics_lines = 0  # lines this run has in metrics.jsonl (a checkpoint stores it; a resume truncates to it)
        self._fingerprint = None
        self._writer = None

    def _schedule_length(self, config: DictConfig) -> int:
        """The warm-up + cosine schedule's length in steps under ``config`` (this trainer's data)."""
        return config.optim.steps or config.optim.epochs * self.steps_per_epoch

    # ------------------------------------------------------------------------------ pieces
    def _sync_batch_norm(self) -> None:
        """Under torchrun a BatchNorm (the cnn tower's) normalises by the global batch's statistics on
        CUDA (SyncBatchNorm); on the CPU torch has no SyncBatchNorm, so each rank's statistics are
        those of its own B / W rows, which a note says once."""
        if self.world_size == 1 or not distributed.has_batch_norm(self.model):
            return
        if self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif self.is_main:
            print(f"plait: note: the model's BatchNorm layers use each rank's own {self.config.data.batch_size // self.world_size} "
                  "rows for their statistics (torch's SyncBatchNorm needs CUDA); results differ slightly from one process",
                  file=sys.stderr)

    def _momentum_copy(self) -> nn.Module | None:
        """The momentum encoder of ``train.bank_momentum`` (None when it is 0)."""
        momentum = float(self.config.train.bank_momentum)
        if momentum == 0.0:
            return None
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"train.bank_momentum must be in [0, 1), got {momentum}")
        if self.config.model.kind == "fusion":
            raise ValueError("train.bank_momentum is for two-tower models; a fusion model has its own momentum encoders "
                             "(model.fusion.momentum)")
        base = self.loss_fn.base
        if not hasattr(base, "resolved_estimator") or base.resolved_estimator(self.config.model.embed_dim) != "memory":
            raise ValueError("train.bank_momentum needs the gamma loss with a memory bank (loss.options.estimator: memory)")
        return copy.deepcopy(self.model).requires_grad_(False).eval()

    @torch.no_grad()
    def _update_momentum(self) -> None:
        """theta_m <- m theta_m + (1 - m) theta after each optimizer step; buffers are copied."""
        momentum = float(self.config.train.bank_momentum)
        for slow, fast in zip(self.momentum_model.parameters(), self.model.parameters()):
            slow.mul_(momentum).add_(fast.detach(), alpha=1.0 - momentum)
        for slow, fast in zip(self.momentum_model.buffers(), self.model.buffers()):
            slow.copy_(fast)

    def _augmenter(self, side: str):
        """The augmentation of one side's modality, if its training view is augmented or the
        objective needs a second, augmented view."""
        from plait.data import ImageAugment, TextAugment, VectorAugment

        modality = self.train_set.modalities[0 if side == "a" else 1]
        augment = self.config.data.augment
        if not (augment[modality] or self.loss_fn.needs_augmented):
            return None
        key = f"data.augment.{modality}_options"
        options = OmegaConf.to_container(augment[f"{modality}_options"], resolve=True) or {}
        options.setdefault("seed", self.config.seed + (0 if side == "a" else 1) + RANK_SEED_STRIDE * self.rank)
        cls = {"image": ImageAugment, "text": TextAugment}.get(modality, VectorAugment)
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "image_size")]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"{key} has no option {', '.join(map(repr, unknown))}; the {modality} augmentation's options: "
                             f"{', '.join(accepted)}")
        scale = options.get("crop_scale")
        if scale is not None and not (isinstance(scale, (list, tuple)) and len(scale) == 2
                                      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale)):
            raise ValueError(f"{key}.crop_scale={scale!r} is not valid: it must be [min, max] with 0 < min <= max <= 1")
        if scale is not None:
            options["crop_scale"] = tuple(scale)
        try:
            if modality == "image":
                return ImageAugment(image_size=self.train_set.image_size, **options).to(self.device)
            return cls(**options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{key}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None

    def _augmented(self, side: str, x, index):
        if self.train_set.modalities[0 if side == "a" else 1] == "text":
            alternatives = [self.train_set.alternatives[i] for i in index.tolist()] if self.train_set.alternatives else None
            return self.augment[side](list(x), alternatives)
        return self.augment[side](x)

    def _prepare(self, index, a, b):
        """(index, a, b, a_aug, b_aug) on the device: the training views (augmented where the
        config says so) and, when the objective needs them, second augmented views."""
        a = self._to_device(a)
        b = self._to_device(b)
        a_aug = b_aug = None
        if self.loss_fn.needs_augmented and not getattr(self.model, "provides_augmented", False):
            a_aug, b_aug = self._augmented("a", a, index), self._augmented("b", b, index)
        if self._augment_views[0]:
            a = self._augmented("a", a, index)
        if self._augment_views[1]:
            b = self._augmented("b", b, index)
        return index.to(self.device), a, b, a_aug, b_aug

    def _to_device(self, x):
        """A view on the device (floating tensors in the parameters' dtype under fp64); texts as a list."""
        if not torch.is_tensor(x):
            return list(x)
        if self.param_dtype is not None and x.is_floating_point():
            return x.to(self.device, self.param_dtype, non_blocking=True)
        return x.to(self.device, non_blocking=True)

    def batch(self, index, a, b, a_aug=None, b_aug=None) -> Batch:
        """The model contract's batch; with ``train.bank_momentum``, the momentum copy's features
        of the training views for the loss's memory bank."""
        bank = None
        if self.momentum_model is not None:
            with torch.no_grad():
                bank = (self.momentum_model.encode_a(a), self.momentum_model.encode_b(b))
        return Batch(index, a, b, a_aug, b_aug, bank)

    def _encode_train_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training item's (z_a, z_b) under the current model, without augmentation or gradient."""
        from plait.evaluate.suite import embed

        za, zb = embed(self.model, self.train_set, self.config.eval.batch_size, self.device)
        return za.to(self.device), zb.to(self.device)

    def refresh_candidates(self) -> str | None:
        """Give the base loss every item's current features when it asks (``estimator: exact`` each
        step, ``memory`` every ``bank_refresh_steps``). Returns a fault (and writes nothing) when
        some item's features are not finite, else None."""
        base = self.loss_fn.base
        if hasattr(base, "needs_candidates") and base.needs_candidates(self.config.model.embed_dim):
            if self.world_size > 1 and distributed.has_batch_norm(self.model):  # rank 0's running statistics everywhere
                distributed.broadcast_buffers(self.model)
            za, zb = self._encode_train_set()
            if not bool(torch.isfinite(za).all() & torch.isfinite(zb).all()):
                return "non-finite features of the training set (for the loss's memory bank)"
            base.refresh_bank(za, zb)
        return None

    def staleness(self) -> dict | None:
        """The base loss's rate error against a frozen snapshot of the training set (see
        ``GammaContrastiveLoss.staleness``), or None for a loss without per-sample state."""
        base = self.loss_fn.base
        if not hasattr(base, "staleness"):
            return None
        was_training = self.model.training
        za, zb = self._encode_train_set()
        stats = base.staleness(za, zb, self.model.scale().detach().float(), batch_size=self.config.data.batch_size, seed=self.epoch)
        self.model.train(was_training)
        return stats

    def train_step(self, index, a, b) -> torch.Tensor | None:
        """One optimizer step on a batch; the detached loss, or None for a step skipped for a
        non-finite loss or gradient (``train.on_nonfinite=skip``; with ``stop`` that raises).

        A skipped step makes no optimizer (nor momentum-encoder) update but counts: the scheduler
        steps, so the schedule and the data position stay aligned with the step count. What the
        loss's forward pass wrote into its per-sample state is kept: the losses write only finite
        entries, estimates under the current (unchanged, finite) parameters."""
        index, a, b, a_aug, b_aug = self._prepare(index, a, b)
        fault = self.refresh_candidates()  # (every rank alike)
        if fault is not None:
            return self._fault(fault, index)
        if not (self.model.training and self.loss_fn.training):  # evaluation switches them off
            self.model.train()
            self.loss_fn.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with runtime.autocast(self.device, self.amp_dtype):
                batch = self.batch(index, a, b, a_aug, b_aug)
            out = self._forward_backward(batch)
        except ObjectiveError as error:  # a feature row with no direction (all zeros) is refused by the loss
            fault = _degenerate_features(error.features, index)
            if fault is None:
                raise
            return self._fault(fault, index)
        loss, features = out.loss, out.features
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        if self._grad_clip:
            norm = nn.utils.clip_grad_norm_(parameters, self._grad_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in parameters])
        # with fp16's grad scaler an overflowing gradient is routine: the scaler skips that step itself
        finite = torch.isfinite(loss.detach()) if self.scaler is not None else torch.isfinite(loss.detach()) & torch.isfinite(norm)
        if self.world_size > 1:  # one decision for every rank (a rank's own terms may differ)
            finite = not distributed.any_rank(not bool(finite))
        if not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale
            if not bool(torch.isfinite(loss.detach())):
                cause = _degenerate_features(features, index)
                return self._fault("non-finite loss" + (f" ({cause})" if cause else ""), index)
            return self._fault(f"non-finite gradient (total norm {float(norm)}; loss {float(loss.detach()):.4g})", index)
        taken = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            taken = self.scaler.get_scale() >= scale  # a lowered scale: the scaler skipped an overflowing step
        else:
            self.optimizer.step()
        self.scheduler.step()
        if taken:  # momentum encoders follow only the steps the optimizer took
            self.model.after_optimizer_step()
            if self.momentum_model is not None:
                self._update_momentum()
        self.consecutive_skips = 0
        self.terms = out.terms  # the named terms of a step taken (a skipped step's are not logged)
        return loss.detach()

    def _forward_backward(self, batch: Batch):
        """The model contract's step and its backward (under DDP the wrapped step, whose backward
        averages the gradients over the ranks; with ``train.grad_cache_chunk`` the encoders run
        chunk by chunk, ``plait.grad_cache``). Returns the step's ``StepOutput``."""
        scale_loss = self.scaler.scale if self.scaler is not None else (lambda loss: loss)
        chunk = int(self.config.train.grad_cache_chunk)
        if chunk:
            from plait.grad_cache import grad_cache_step

            step = self.step_module
            no_sync = getattr(step, "no_sync", contextlib.nullcontext)

            def features(part: Batch):  # forward passes in the autocast region, backward passes outside it
                with runtime.autocast(self.device, self.amp_dtype):
                    return step(part, None)

            return grad_cache_step(features, batch, self.loss_fn, chunk, no_sync=no_sync, scale_loss=scale_loss)
        with runtime.autocast(self.device, self.amp_dtype):
            if self.world_size > 1:
                out = self.step_module(batch, self.loss_fn)
            else:  # one process: the model itself, no wrapper in the way
                out = self.model.training_step(batch, self.loss_fn)
        scale_loss(out.loss).backward()  # outside autocast, as torch recommends
        return out

    def _fault(self, what: str, index: torch.Tensor) -> None:
        """A step that cannot be taken: raise (``stop``, or parameters already non-finite, or too many
        skips in a row), or count it as skipped (``skip``): the scheduler still steps."""
        shown = index.tolist()
        indices = ", ".join(map(str, shown[:8])) + (", ..." if len(shown) > 8 else "")
        where = (f"step {self.step + 1}: {what} (epoch {self.epoch}, batch {self.batch_in_epoch + 1} of the epoch; "
                 f"training-set indices {indices} ({len(shown)} items))")
        broken = _nonfinite_tensor(self.model)
        if broken is not None:
            where += f"; the model's parameters are no longer finite ({broken}): skipping steps cannot recover"
        elif self._skip_nonfinite:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips < MAX_CONSECUTIVE_SKIPS:
                if self.is_main:
                    print(f"plait: skipped {where} (train.on_nonfinite=skip; {self.skipped_steps} skipped so far)", file=sys.stderr)
                with warnings.catch_warnings():  # a skipped first step: "lr_scheduler.step() before optimizer.step()"
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                return None
            where += f"; {self.consecutive_skips} consecutive steps were skipped (train.on_nonfinite=skip stops after {MAX_CONSECUTIVE_SKIPS})"
        then = ("resume from it (--resume, possibly with train.on_nonfinite=skip) or start again with a lower optim.lr "
                "(--overwrite)" if self.last_checkpoint is not None else "start again with a lower optim.lr (--overwrite)")
        raise ValueError(f"training stopped at {where}; {self._last_good()}; nothing was saved after the fault: {then}")

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint had been written"
        path, step = self.last_checkpoint
        return f"the last good checkpoint is {path} (step {step}), left untouched"

    # ------------------------------------------------------------------------------ state
    def state(self) -> dict:
        augment = {side: module.get_state() for side, module in self.augment.items() if module is not None}
        return {
            "config": to_yaml(self.config),
            "inputs": self.inputs,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": runtime.rng_state(),
            "augment": augment,
            "progress": {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                         "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                         "metrics_lines": self.metrics_lines,
                         # the steps since the last log line: a resumed run logs the same mean loss
                         "window_losses": [float(x) for x in self._window_losses], "window_samples": self._window_samples},
            "momentum_model": self.momentum_model.state_dict() if self.momentum_model is not None else {},
            "data": self.data_fingerprint,
            "precision": self.precision_name,  # the autocast dtype it trained in (a resume keeps it)
            **self._rank_states(augment),
        }

    def _rank_states(self, augment: dict) -> dict:
        """Under torchrun: every rank's global random state and augmentation state, in rank order
        (``rng`` and ``augment`` are rank 0's), and the world size."""
        if self.world_size == 1:
            return {}
        ranks = distributed.all_objects({"rng": runtime.rng_state(), "augment": augment})
        return {"world_size": self.world_size, "rng_ranks": [r["rng"] for r in ranks],
                "augment_ranks": [r["augment"] for r in ranks]}

    @property
    def precision_name(self) -> str:
        """fp64 (parameters in float64) or the autocast dtype's name (fp32: none)."""
        return "fp64" if self.param_dtype == torch.float64 else _precision_name(self.amp_dtype)

    @property
    def data_fingerprint(self) -> dict:
        """``data_fingerprint`` of the training set (computed once): a resume checks it."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.train_set)
        return self._fingerprint

    def load_state(self, state: dict, source: str = "the checkpoint") -> None:
        """Load a checkpoint's state (checked first by :meth:`check_checkpoint`: nothing is loaded from a
        malformed one). A part that still does not load is one ValueError naming it."""
        self.check_checkpoint(state, source)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:  # another tower shape (image size, vocabulary, ...)
            reason = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line or "Missing" in line),
                          str(error).splitlines()[0])
            raise ValueError(f"the checkpoint's model does not fit this config's model: {reason.rstrip(':.')}") from None
        parts = [
            ("momentum_model", lambda: self.momentum_model.load_state_dict(state["momentum_model"]) if self.momentum_model is not None else None),
            ("optimizer", lambda: self.optimizer.load_state_dict(state["optimizer"])),
            ("scheduler", lambda: self.scheduler.load_state_dict(state["scheduler"])),
            ("loss", lambda: self.loss_fn.load_state_dict(state["loss"])),
            ("scaler", lambda: self.scaler.load_state_dict(state["scaler"]) if self.scaler is not None and state.get("scaler") else None),
        ]
        for part, load in parts:
            try:
                load()
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
                raise ValueError(f"cannot resume from {source}: its {part} state does not load ({_first_line(error)})") from None
        rng, augment = self._rank_random_state(state)
        for side, module in self.augment.items():
            if module is not None and side in augment:
                module.set_state(augment[side])
        if rng is not None:
            runtime.set_rng_state(rng)
        progress = state["progress"]
        self.step, self.epoch, self.batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        self.skipped_steps = progress.get("skipped_steps", 0)
        self.consecutive_skips = progress.get("consecutive_skips", 0)
        self._window_losses[:] = [torch.tensor(x, dtype=torch.float32) for x in progress.get("window_losses", [])]
        self._window_samples = int(progress.get("window_samples", 0))

    def _rank_random_state(self, state: dict) -> tuple[dict | None, dict]:
        """(global random state, augmentation states) this rank resumes with: its own from a
        checkpoint of the same world size; rank 0's (``rng``, ``augment``) on rank 0 otherwise,
        and on the other ranks none (their fresh seeds): random draws continue bitwise only under
        the world size the checkpoint was written with."""
        ranks = state.get("rng_ranks")
        if isinstance(ranks, list) and len(ranks) == self.world_size:
            return ranks[self.rank], (state.get("augment_ranks") or [{}] * self.world_size)[self.rank] or {}
        if self.rank == 0:
            return state["rng"], state.get("augment") or {}
        return None, {}

    def check_checkpoint(self, state: dict, source: str = "the checkpoint") -> None:
        """The checkpoint's structure, types and value ranges, before anything is loaded from it: the
        parts a resume needs, each of the right type; the training position consistent with this run
        (step = epoch x steps per epoch + batch, within the schedule, the scheduler at that step);
        every random state loadable; the model's, the loss's and the optimizer's tensors of this run's
        shapes. A ValueError names the key."""

        def refuse(key: str, what: str) -> None:
            raise ValueError(f"cannot resume from {source}: {key} {what} (a corrupt or crafted checkpoint?)")

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("loss", dict), ("rng", dict),
                          ("progress", dict), ("config", str)):
            if key not in state:
                refuse(key, "is missing")
            if not isinstance(state[key], kind):
                refuse(key, f"is a {type(state[key]).__name__}, not a {kind.__name__}")
        for key in ("augment", "scaler", "momentum_model"):
            if key in state and not isinstance(state[key], dict):
                refuse(key, f"is a {type(state[key]).__name__}, not a dict")
        progress = state["progress"]
        for key in ("step", "epoch", "batch_in_epoch"):
            if key not in progress:
                refuse(f"progress.{key}", "is missing")
        for key in ("step", "epoch", "batch_in_epoch", "skipped_steps", "consecutive_skips", "window_samples", "metrics_lines"):
            value = progress.get(key, 0)
            if not ((integer(value) and 0 <= value <= 10**12) or (key == "metrics_lines" and value is None)):
                refuse(f"progress.{key}", f"is {value!r:.40}, not an integer >= 0")
        window = progress.get("window_losses", [])
        if not (isinstance(window, list) and len(window) <= 10**6
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in window)):
            refuse("progress.window_losses", "is not a list of finite numbers")
        step, epoch, batch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
        if batch > self.steps_per_epoch or step != epoch * self.steps_per_epoch + batch or step > self.schedule_steps:
            refuse("progress", f"says step {step} at epoch {epoch}, batch {batch}, which does not fit this run's "
                               f"{self.steps_per_epoch} steps per epoch and {self.schedule_steps}-step schedule")
        last = state["scheduler"].get("last_epoch")
        if last != step:
            refuse("scheduler.last_epoch", f"is {last!r:.40}, not the step {step}")
        ranks = state.get("rng_ranks")
        augments = state.get("augment_ranks")
        if ranks is not None and not (isinstance(ranks, list) and 1 <= len(ranks) <= 100_000):
            refuse("rng_ranks", "is not a list of random states")
        if augments is not None and not (isinstance(augments, list) and isinstance(ranks, list) and len(augments) == len(ranks)
                                         and all(isinstance(a, dict) for a in augments)):
            refuse("augment_ranks", "is not one augmentation state per rank")
        for key, rng in [("rng", state["rng"])] + [(f"rng_ranks[{r}]", x) for r, x in enumerate(ranks or [])]:
            try:
                runtime.check_rng_state(rng)
            except ValueError as error:
                refuse(key, f"is not a random state plait wrote ({error})")
        saved_augments = [state.get("augment") or {}] + list(augments or [])
        for side, saved in [item for augment in saved_augments for item in augment.items()]:
            if not (isinstance(saved, dict) and integer(saved.get("seed")) and ("generator" in saved or "rng" in saved)):
                refuse(f"augment.{side}", "is not an augmentation state")
            try:  # tried on throwaway generators: torch's (images, vectors) or Python's (text)
                if "generator" in saved:
                    torch.Generator().set_state(saved["generator"])
                else:
                    random.Random().setstate(saved["rng"])
            except (RuntimeError, TypeError, ValueError, AttributeError) as error:
                refuse(f"augment.{side}", f"holds no generator state ({_first_line(error)})")
        modules = [("model", self.model), ("loss", self.loss_fn)]
        if self.momentum_model is not None:
            if not state.get("momentum_model"):
                raise ValueError("the checkpoint has no momentum encoder, but train.bank_momentum > 0; resume with the settings it was trained with")
            modules.append(("momentum_model", self.momentum_model))
        for key, module in modules:
            expected, saved = module.state_dict(), state[key]
            missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            sized = key != "loss"  # the losses' buffers grow with use (a memory bank starts empty): names and types only
            wrong = [name for name in expected if name in saved
                     and not (torch.is_tensor(saved[name]) and (not sized or nn.parameter.is_lazy(expected[name])
                                                               or tuple(saved[name].shape) == tuple(expected[name].shape)))]
            if not (missing or unexpected or wrong):
                continue
            if wrong:
                value = saved[wrong[0]]
                what = (f"size mismatch for {wrong[0]}: {tuple(value.shape)} in the checkpoint, {tuple(expected[wrong[0]].shape)} "
                        "in this run" if torch.is_tensor(value) else f"{wrong[0]} is a {type(value).__name__}, not a tensor")
            else:
                what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + ("; " if missing and unexpected else "") \
                       + (f"{len(unexpected)} unexpected (e.g. {str(unexpected[0])[:60]})" if unexpected else "")
            if key == "model":  # another tower shape (image size, vocabulary, ...): a config difference
                raise ValueError(f"the checkpoint's model does not fit this config's model: {what}")
            refuse(key, f"does not fit this run's {key}: {what}")
        self._check_optimizer_state(state["optimizer"], refuse)

    def _check_optimizer_state(self, saved: dict, refuse) -> None:
        """The optimizer's saved state: as many groups and parameters as this run's, each state
        tensor of its parameter's shape."""
        groups, current = saved.get("param_groups"), self.optimizer.param_groups
        if not (isinstance(groups, list) and len(groups) == len(current)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(c["params"])
                        for g, c in zip(groups, current))):
            refuse("optimizer.param_groups", "do not match this run's parameter groups")
        shapes = {}
        for group, live in zip(groups, current):
            for index, parameter in zip(group["params"], live["params"]):
                shapes[index] = None if nn.parameter.is_lazy(parameter) else tuple(parameter.shape)
        entries = saved.get("state")
        if not isinstance(entries, dict):
            refuse("optimizer.state", "is not a mapping")
        for index, entry in entries.items():
            if index not in shapes or not isinstance(entry, dict):
                refuse(f"optimizer.state[{str(index)[:20]}]", "is not a state of one of this run's parameters")
            for name, value in entry.items():
                if torch.is_tensor(value) and value.dim() > 0 and shapes[index] is not None and tuple(value.shape) != shapes[index]:
                    refuse(f"optimizer.state[{index}].{name}", f"has shape {tuple(value.shape)}, its parameter {shapes[index]}")

    def _check_finite(self, target: Path) -> None:
        """Refuse to write ``target`` from a model with a non-finite parameter or buffer."""
        broken = _nonfinite_tensor(self.model, self.momentum_model)
        if broken is not None:
            raise ValueError(f"not writing {target}: the model's {broken} is not finite at step {self.step}; "
                             f"{self._last_good()}")

    def save(self) -> Path:
        """Write ``checkpoint.pt`` (atomically; refused for a model that is no longer finite)."""
        path = self.run_dir / "checkpoint.pt"
        self._check_finite(path)
        state = self.state()  # under torchrun every rank takes part (each rank's random state)
        if self.is_main:
            save_checkpoint(path, state)
        self.last_checkpoint = (path, self.step)
        return path

    def export(self) -> Path:
        """Write ``model.safetensors`` (atomically; refused for a model that is no longer finite)."""
        path = self.run_dir / "model.safetensors"
        self._check_finite(path)
        return export_weights(self.model, path, to_yaml(self.config), inputs=self.inputs)

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from a checkpoint (default ``output_dir/checkpoint.pt``) made with the same settings
        (``RESUME_MAY_CHANGE`` aside) and the same training data; ``metrics.jsonl`` loses the lines of
        steps after the checkpoint's."""
        self._resumed_from = True if path is None else Path(path)
        path = Path(path) if path else self.run_dir / "checkpoint.pt"
        # on the CPU: random states must be CPU tensors (torch.set_rng_state, generators), and
        # load_state_dict copies every other tensor onto its parameter's device
        state = load_checkpoint(path, map_location="cpu")
        shown = display_path(path)
        for key, kind in (("config", str), ("progress", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"cannot resume from {shown}: {key} is {'missing' if key not in state else 'malformed'} "
                                 "(a corrupt or crafted checkpoint?)")
        self.check_resumable(state, path)
        self.load_state(state, shown)
        self.last_checkpoint = (path, self.step)
        self._resumed = True
        if self.is_main:
            self._truncate_metrics(self.step, state["progress"].get("metrics_lines"))

    def check_resumable(self, state: dict, path: Path) -> None:
        """Refuse a checkpoint made with other settings or other training data (one ValueError
        naming every differing key with both values)."""
        shown = display_path(path)
        try:
            saved = from_yaml(state.get("config"), source=shown, allow_import=self.allow_import)
        except ValueError as error:
            raise ValueError(f"cannot resume from {shown}: {error}") from None
        stored = state.get("data")
        fingerprinted = isinstance(stored, dict)  # the data's location may change: the fingerprint proves them the same
        may_change = (*RESUME_MAY_CHANGE, *ALWAYS_MAY_CHANGE, "optim.epochs", "optim.steps", *(DATA_LOCATION if fingerprinted else ()))
        changes = [f"{key}: {_show(old)} in the checkpoint, {_show(new)} now"
                   for key, old, new in config_differences(saved, self.config, may_change)]
        fp64 = state.get("precision") == "fp64" or (state.get("precision") is None and saved.train.precision == "fp64")
        before_dtype = "fp64" if fp64 else _precision_name(_saved_autocast(state, saved, self.device))
        now_dtype = self.precision_name
        if before_dtype != now_dtype:
            changes.append(f"train.precision: the checkpoint trained in {before_dtype}, this run would use {now_dtype} "
                           f"(train.precision={self.config.train.precision} on {self.device.type}); set train.precision="
                           f"{before_dtype} to resume it here")
        before = self._schedule_length(saved)
        if before != self.schedule_steps:
            keys = [k for k in ("optim.epochs", "optim.steps") if OmegaConf.select(saved, k) != OmegaConf.select(self.config, k)]
            changes.append(", ".join(f"{k}: {_show(OmegaConf.select(saved, k))} in the checkpoint, {_show(OmegaConf.select(self.config, k))} now"
                                     for k in keys)
                           + f" (the lr schedule would span {self.schedule_steps} steps instead of {before}, so the lr would jump; "
                             "optim.max_steps may change)")
        if changes:
            raise ValueError(f"cannot resume from {shown} with changed settings: {'; '.join(changes)}. Resume with the "
                             "checkpoint's settings, or start a new run (another output_dir, or --overwrite)")
        if fingerprinted and stored != self.data_fingerprint:  # checkpoints before fingerprints: not checked
            now = self.data_fingerprint["size"]
            how = (f"same size ({now} items) but different data" if stored.get("size") == now
                   else f"{stored.get('size')} items in the checkpoint, {now} now")
            raise ValueError(f"cannot resume from {shown}: the training data differ from the checkpoint's ({how}); "
                             "resume with the data it was trained on, or start a new run")

    def _truncate_metrics(self, step: int, count: int | None = None) -> None:
        """Keep the lines of ``metrics.jsonl`` logged before the checkpoint (its first ``count``, when
        the checkpoint says), without those of later steps or unreadable (torn) ones, atomically: a
        resumed run logs no record twice."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines[:count] if isinstance(count, int) and 0 <= count <= len(lines) else lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
        if keep != lines:
            atomic_write_text(path, "".join(keep))
        self.metrics_lines = len(keep)

    # ------------------------------------------------------------------------------ logging
    def log(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl (and TensorBoard); rank 0 only under torchrun."""
        if not self.is_main:
            return
        path = self.run_dir / "metrics.jsonl"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps(_finite_or_none(record)) + "\n")
        except OSError as error:  # a full disk, a read-only directory: one line (a resume drops a torn line)
            raise WriteError(error.errno, f"could not append to {display_path(path)}: {error.strerror or error} "
                                          f"(step {record.get('step')}; {self._last_good()})") from None
        self.metrics_lines += 1
        if self.config.train.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            prefix = "eval/" if record.get("split") == "eval" else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._writer.add_scalar(prefix + key, value, record["step"])

    # ------------------------------------------------------------------------------ loops
    def fit(self, overwrite: bool = False) -> dict:
        """Train to the end of the schedule (from where a resumed run stopped), save, export and
        evaluate. A new run refuses an ``output_dir`` holding another run's files, unless
        ``overwrite`` (which deletes them first); temporary files of interrupted writes are removed."""
        failure = None
        if self.is_main:  # under torchrun rank 0 alone checks and writes the run directory
            try:
                self._open_run_dir(overwrite)
            except (ValueError, OSError) as error:
                failure = error
        message = distributed.broadcast_error(None if failure is None else _first_line(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise ValueError(f"rank 0 stopped: {message}")
        self.train_until(self.total_steps)
        return self.finish()

    def _open_run_dir(self, overwrite: bool) -> None:
        check_run_dir(self.run_dir, self._resumed_from, overwrite)
        if overwrite:
            remove_outputs(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create output_dir {display_path(self.run_dir)}: {error.strerror or error}") from None
        for stale in temp_files(self.run_dir):
            stale.unlink(missing_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.config))
        if self._write_skipped is not None:
            self._write_skipped(self.run_dir)

    def train_until(self, total_steps: int) -> None:
        """The training loop alone, up to ``total_steps`` steps in all."""
        from plait.runtime import progress_bar

        config = self.config
        bar = progress_bar(total_steps, config.train.progress and self.is_main, initial=self.step,  # rank 0's, on a terminal
                           desc=config.name, unit="step", dynamic_ncols=True)
        try:
            self._loop(total_steps, bar)
        finally:  # a fault or an interrupt leaves no half-drawn bar behind
            bar.close()

    def _loop(self, total_steps: int, bar) -> None:
        config = self.config
        window_start, running = time.perf_counter(), self._window_losses  # the window survives a resume
        log_every, checkpoint_every = int(config.train.log_every), int(config.train.checkpoint_every_steps or 0)
        while self.step < total_steps:
            self.sampler.set_position(self.epoch, self.batch_in_epoch * config.data.batch_size)
            for index, a, b in self.loader:
                loss = self.train_step(index, a, b)
                self.step += 1
                self.batch_in_epoch += 1
                self._window_samples += len(index)
                if loss is not None:
                    running.append(loss)
                bar.update()
                if self.step % log_every == 0 or self.step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    mean_loss = torch.stack(running).mean().item() if running else None  # None: every step skipped
                    terms = {key: float(value) for key, value in self.terms.items()}  # the named terms of the last step taken
                    if self.world_size > 1:  # the ranks' own terms (fusion's ITM, MLM) differ: their means
                        shown = [mean_loss if mean_loss is not None else 0.0, *terms.values()]
                        means = distributed.all_mean(shown)
                        mean_loss = means[0] if mean_loss is not None else None
                        terms = dict(zip(terms, means[1:]))
                    record = {
                        "step": self.step, "epoch": self.epoch, "loss": mean_loss,
                        "lr": self.scheduler.get_last_lr()[0], "logit_scale": self.model.scale().item(),
                        # every rank's samples: the global batch
                        "samples_per_s": self._window_samples * self.world_size / max(elapsed, 1e-9),
                    }
                    if self._skip_nonfinite:
                        record["skipped_steps"] = self.skipped_steps
                    record.update(terms)
                    self.log(record)
                    if running:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", samples_per_s=f"{record['samples_per_s']:.0f}")
                    window_start, self._window_samples = time.perf_counter(), 0
                    running.clear()
                if self.step >= total_steps:
                    if self.batch_in_epoch == self.steps_per_epoch:  # the last step closed an epoch
                        self._end_epoch()
                    if checkpoint_every and self.step % checkpoint_every == 0:
                        self.save()
                    break
                if checkpoint_every and self.step % checkpoint_every == 0:
                    self.save()
            else:  # the epoch ran to its end
                self._end_epoch()

    def _end_epoch(self) -> None:
        """Count a finished epoch; log the state's staleness, evaluate and checkpoint as configured
        (no evaluation after the last step: ``finish`` does it)."""
        config = self.config
        self.epoch += 1
        self.batch_in_epoch = 0
        if config.train.staleness_every_epochs and self.epoch % config.train.staleness_every_epochs == 0 and self.is_main:
            stats = self.staleness()
            if stats is not None:
                self.log({"step": self.step, "epoch": self.epoch, "split": "staleness", **stats})
        if (config.train.eval_every_epochs and self.epoch % config.train.eval_every_epochs == 0 and self.step < self.total_steps
                and self._has_split(self.periodic_split) and self.is_main):  # the other ranks wait at the next collective
            self.log({"step": self.step, "epoch": self.epoch, "split": self.periodic_split,
                      **self.evaluate(write=False, on=self.periodic_split)})
        if config.train.checkpoint_every_epochs and self.epoch % config.train.checkpoint_every_epochs == 0:
            self.save()

    @property
    def periodic_split(self) -> str:
        """Where evaluations during training look: the validation split if there is one."""
        return "validation" if self.validation_set is not None else "eval"

    def _has_split(self, on: str) -> bool:
        """Whether the split an evaluation reads has items (user data may have no test split)."""
        return on in ("validation", "staleness") or len(self.test_set) > 0

    def finish(self) -> dict:
        """Save, export and run the final evaluation (skipped, with a note in eval.json and on
        stderr, when the test split it reads is empty)."""
        config = self.config
        self.save()
        metrics = self._finish_main() if self.is_main else None
        if self.world_size > 1:  # every rank returns rank 0's evaluation
            metrics = distributed.all_objects(metrics)[0]
        return metrics

    def _finish_main(self) -> dict:
        config = self.config
        self.export()
        on = config.eval.split
        metrics = None
        if self._has_split(on):
            metrics = self.evaluate(write=True, on=on)
        if self.validation_set is not None and on == "test" and config.train.eval_every_epochs:
            # the last point of the validation curve, beside the final test evaluation
            self.log({"step": self.step, "epoch": self.epoch, "split": "validation", **self.evaluate(write=False, on="validation")})
        if metrics is None:
            note = "no test split (set data.options.test_fraction > 0 or a test file, or use eval.split=validation)"
            print(f"plait: note: the final evaluation was skipped: {note}", file=sys.stderr)
            atomic_write_text(self.run_dir / "eval.json", json.dumps(
                {**self._eval_info(on), "skipped": note, "metrics": {}}, indent=1))
            metrics = {}
        else:
            self.log({"step": self.step, "epoch": self.epoch, "split": "eval" if on == "test" else "validation", **metrics})
        if self._writer is not None:
            self._writer.close()
        return metrics

    def _eval_info(self, on: str) -> dict:
        return {"name": self.config.name, "dataset": self.config.data.name, "loss": self.config.loss.name,
                "batch_size": self.config.data.batch_size, "steps": self.step,
                "split": "validation" if on == "validation" else "test"}

    def evaluate(self, write: bool, on: str = "test") -> dict:
        """Metrics on the validation split (``on="validation"``) or the test split."""
        from plait.evaluate.suite import evaluate_model

        target = self.validation_set if on == "validation" else self.test_set
        return evaluate_model(
            self.model, self.train_set, target, self.config.eval, self.device,
            run_dir=self.run_dir if write else None, info=self._eval_info(on),
        )


def train(config: DictConfig, resume: bool | str = False, overwrite: bool = False, allow_import: bool = False) -> dict:
    """Run ``config`` to the end: a new run (``output_dir`` must not hold another run's files unless
    ``overwrite``), or ``resume`` (True: ``output_dir/checkpoint.pt``, or a checkpoint path)."""
    check_run_dir(config.output_dir, resume, overwrite)  # before anything is built
    joined = distributed.init(config.train.device, config.train.dist_timeout_s)  # under torchrun: its process group
    finished = False
    try:
        trainer = Trainer(config, allow_import=allow_import)
        if resume:
            trainer.resume(None if resume is True else resume)
        metrics = trainer.fit(overwrite=overwrite)
        finished = True
        return metrics
    finally:
        if joined:
            distributed.teardown(finished)
