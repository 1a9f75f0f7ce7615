"""Building a run from a config: every part the loop needs, in one order that fixes the random
draws (so a config always gives the same run).

Order: validate the settings -> device, precision, ranks -> seed -> datasets (and the validation
split) -> the rules that need the data -> objective -> model (its initial weights are the first
draws of the seeded generator) -> SyncBatchNorm -> callbacks (a momentum bank copies the model
here, before the DDP wrapper) -> DDP wrapper -> each rank's own seed -> sampler and loader (their
own generators) -> schedule -> optimizer, lr scheduler, grad scaler -> batch preparation
(augmentation, its own generators). Nothing is written anywhere.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from plait import distributed, runtime
from plait.config import validate, validate_with_data
from plait.data.sampler import EpochSampler
from plait.optim import parameter_groups, warmup_cosine
from plait.training.batches import RANK_SEED_STRIDE, BatchPreparer
from plait.training.callbacks import Callback, default_callbacks
from plait.training.step import OptimizerStep


@dataclass(eq=False, repr=False)  # a run is compared by identity, and its repr would print every dataset
class RunParts:
    """Everything a run is made of; a :class:`plait.training.Trainer` carries each as an attribute.

    ``train_set`` / ``validation_set`` / ``test_set`` the data (the validation split carved from
    the training split by group, seed 0, when ``data.validation_fraction > 0``); ``loss_fn`` the
    objective (``plait.losses.objective.ContrastiveObjective``); ``model`` and ``step_module`` (its
    training step, DDP-wrapped under torchrun); ``update`` the optimizer step (``optimizer``,
    ``scheduler``, ``scaler``); ``batches`` the batch preparation (``augment``); ``callbacks``."""

    config: DictConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    param_dtype: torch.dtype | None
    rank: int
    world_size: int
    is_main: bool  # rank 0 alone writes files (plait.distributed)
    train_set: Any
    test_set: Any
    validation_set: Any
    write_skipped: Any  # the reader's skipped_rows.json writer, at fit()
    loss_fn: nn.Module
    inputs: dict  # the input spec, stored with the weights: a saved model is rebuilt without its data
    model: nn.Module
    step_module: nn.Module
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    schedule_steps: int
    total_steps: int
    update: OptimizerStep
    batches: BatchPreparer
    callbacks: list[Callback] = field(default_factory=list)


def schedule_length(config: DictConfig, steps_per_epoch: int) -> int:
    """The warm-up + cosine schedule's length in steps under ``config``."""
    return config.optim.steps or config.optim.epochs * steps_per_epoch


def _datasets(config: DictConfig) -> tuple[Any, Any, Any, Any]:
    """(train, validation or None, test, skipped-rows writer or None) of the config's data."""
    from plait.data import build_dataset, carve_validation

    options = OmegaConf.to_container(config.data.options, resolve=True) or {}
    train_set = build_dataset(config.data.name, split="train", **options)
    test_set = build_dataset(config.data.name, split="test", **options)
    # a library imported lazily by a reader may draw from Python's RNG (sklearn -> rich does):
    # reseed it, so every trainer of a config starts from the same state, first in a process or not
    random.seed(config.seed)
    write_skipped = getattr(train_set, "write_skipped", None)  # a user file reader's: skipped_rows.json
    validation_set = None
    if config.data.validation_fraction:  # seed 0, not config.seed: every training seed sees the same validation split
        train_set, validation_set = carve_validation(train_set, config.data.validation_fraction, seed=0)
    return train_set, validation_set, test_set, write_skipped


def _model(config: DictConfig, train_set, objective, rank: int, allow_import: bool, device: torch.device,
           param_dtype: torch.dtype | None) -> tuple[nn.Module, dict]:
    """The config's model on the device (and in float64 under fp64), with its input spec."""
    from plait.models import build_model, input_spec

    inputs = input_spec(train_set)
    spec = OmegaConf.to_container(config.model, resolve=True)
    # the model's own draws (the fusion model's masks and hard negatives) follow the run's seed and the rank's
    model = build_model(spec, inputs, independent=objective.needs_independent, allow_import=allow_import,
                        seed=config.seed + RANK_SEED_STRIDE * rank).to(device)
    if param_dtype is not None:
        model.to(param_dtype)
        objective.to(param_dtype)
    return model, inputs


def sync_batch_norm(model: nn.Module, device: torch.device, world_size: int, batch_size: int, is_main: bool) -> nn.Module:
    """Under torchrun a BatchNorm (the cnn tower's) normalises by the global batch's statistics on
    CUDA (SyncBatchNorm); on the CPU torch has no SyncBatchNorm, so each rank's statistics are
    those of its own B / W rows, which a note says once."""
    if world_size == 1 or not distributed.has_batch_norm(model):
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if is_main:
        print(f"plait: note: the model's BatchNorm layers use each rank's own {batch_size // world_size} rows for their "
              "statistics (torch's SyncBatchNorm needs CUDA); results differ slightly from one process", file=sys.stderr)
    return model


def _optimizer_step(config: DictConfig, model: nn.Module, device: torch.device, amp_dtype, schedule: int,
                    world_size: int) -> OptimizerStep:
    """AdamW (no decay on biases, norms, the logit scale), warm-up + cosine over ``schedule`` steps,
    fp16's grad scaler, clipping at ``optim.grad_clip``."""
    optim = config.optim
    optimizer = torch.optim.AdamW(
        parameter_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
        fused=device.type in ("cpu", "cuda"),  # the fused kernel: 4x faster than the loop on a 2M-row embedding table (CPU)
    )
    warmup = max(1, int(optim.warmup_fraction * schedule))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(schedule, warmup))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return OptimizerStep(optimizer, scheduler, scaler, grad_clip=float(optim.grad_clip or 0.0), world_size=world_size)


def build_run(config: DictConfig, allow_import: bool = False) -> RunParts:
    """Every part of the run ``config`` describes (settings checked first; nothing written).
    ``allow_import``: encoders named ``package.module:Class`` may be imported (``--allow-import``)."""
    from plait.losses.objective import build_objective

    validate(config)
    device = distributed.device_for_rank(runtime.select_device(config.train.device))
    amp_dtype = runtime.autocast_dtype(config.train.precision, device)
    param_dtype = runtime.parameter_dtype(config.train.precision)
    rank, world_size = distributed.rank(), distributed.world_size()
    runtime.seed_everything(config.seed, config.train.deterministic)  # the same on every rank: the same model
    train_set, validation_set, test_set, write_skipped = _datasets(config)
    validate_with_data(config, train_set, device)
    objective = build_objective(config, len(train_set)).to(device)
    model, inputs = _model(config, train_set, objective, rank, allow_import, device, param_dtype)
    model = sync_batch_norm(model, device, world_size, config.data.batch_size, distributed.is_main())
    callbacks = default_callbacks(config, model, objective)  # a momentum copy of the model, before DDP wraps it
    # under DDP the model's training step is the wrapped forward (one step, one feature path)
    step_module = distributed.wrap(distributed.TrainingStep(model), device)
    if world_size > 1:  # each rank's own dropout draws (the model itself is rank 0's: DDP broadcast it)
        runtime.seed_everything(config.seed + RANK_SEED_STRIDE * rank, config.train.deterministic)
    batch_size = config.data.batch_size  # the global batch: B / world_size rows per rank
    sampler = EpochSampler(len(train_set), config.seed, rank, world_size, batch_size)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=distributed.local_batch_size(batch_size), sampler=sampler, drop_last=True,
        num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG out of the data order
    )
    steps_per_epoch = len(train_set) // batch_size
    schedule = schedule_length(config, steps_per_epoch)
    update = _optimizer_step(config, model, device, amp_dtype, schedule, world_size)
    batches = BatchPreparer(config, train_set, device, param_dtype, objective.needs_augmented, rank)
    return RunParts(config, device, amp_dtype, param_dtype, rank, world_size, distributed.is_main(), train_set, test_set,
                    validation_set, write_skipped, objective, inputs, model, step_module, sampler, loader, steps_per_epoch,
                    schedule, min(schedule, config.optim.max_steps or schedule), update, batches, callbacks)
