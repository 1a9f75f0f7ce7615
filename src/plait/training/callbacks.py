"""Callbacks: how what a model or a loss needs beyond forward and backward reaches the loop.

The loop calls, in order of the list, ``on_step_start(trainer, batch)`` after a batch is on the
device (before the forward pass), ``on_optimizer_step(trainer)`` after each optimizer step that
was taken, and ``on_epoch_end(trainer)`` after each finished epoch (before the periodic
evaluation and checkpoint). A callback with a ``module`` (an ``nn.Module`` of its own) has that
module's state checkpointed under ``state_key``, checked on resume like the model's, and
checked finite before anything is saved.

The built-in callbacks, chosen by :func:`default_callbacks` from what the model and the loss
declare (``plait.models.contract``, ``plait.losses.base``):

- :class:`CandidateRefresh`: every item's current features for a loss that ``reads_candidates``
  (the gamma loss's exact table each step, its memory bank every ``bank_refresh_steps``);
- :class:`MomentumBank`: ``train.bank_momentum``'s momentum copy of the model, whose features of
  each batch fill the loss's memory bank, updated theta_m <- m theta_m + (1 - m) theta;
- :class:`ModelAfterStep`: the model contract's ``after_optimizer_step`` (the fusion model's
  momentum encoders and queue);
- :class:`StalenessLog`: the loss's per-sample state against a frozen snapshot, logged every
  ``train.staleness_every_epochs`` epochs (``split: staleness`` records).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from plait import distributed, runtime
from plait.models.momentum import update_momentum
from plait.training.faults import StepFault
from plait.types import Batch


class Callback:
    """Hooks of the training loop; each is optional (a no-op here)."""

    state_key: str | None = None  # the checkpoint key of ``module``'s state
    module: nn.Module | None = None
    setting: str = ""  # the config key that asks for it (named when a checkpoint lacks its state)
    describes: str = ""  # what its module is, in words

    def on_step_start(self, trainer, batch: Batch) -> None:
        """Before the forward pass of ``batch``; may set ``batch.bank`` or raise :class:`StepFault`."""

    def on_optimizer_step(self, trainer) -> None:
        """After an optimizer step that updated the parameters."""

    def on_epoch_end(self, trainer) -> None:
        """After an epoch ended (``trainer.epoch`` already counts it)."""


class CandidateRefresh(Callback):
    """Gives the base loss every training item's current features when it asks
    (``loss.needs_candidates(embed_dim)``), before the step: (N, d) each side, no augmentation,
    no gradient. Non-finite features write nothing and are a fault of the step."""

    def __init__(self, loss, embed_dim: int):
        self.loss, self.embed_dim = loss, embed_dim

    def on_step_start(self, trainer, batch: Batch) -> None:
        if not self.loss.needs_candidates(self.embed_dim):
            return
        if trainer.world_size > 1 and distributed.has_batch_norm(trainer.model):  # rank 0's running statistics everywhere
            distributed.broadcast_buffers(trainer.model)
        za, zb = trainer.encode_train_set()
        if not bool(torch.isfinite(za).all() & torch.isfinite(zb).all()):
            raise StepFault("non-finite features of the training set (for the loss's memory bank)")
        self.loss.refresh_bank(za, zb)


class MomentumBank(Callback):
    """A momentum copy of the model (``train.bank_momentum`` = m, as MoCo's key encoder) whose
    features of each batch's training views fill the loss's memory bank: ``batch.bank`` =
    (z_a, z_b) of the copy, without gradient, in the step's autocast region; after each optimizer
    step taken, theta_m <- m theta_m + (1 - m) theta (buffers copied)."""

    state_key = "momentum_model"
    setting = "train.bank_momentum"
    describes = "momentum encoder"

    def __init__(self, model: nn.Module, momentum: float):
        self.momentum = float(momentum)
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    def on_step_start(self, trainer, batch: Batch) -> None:
        with runtime.autocast(trainer.device, trainer.amp_dtype), torch.no_grad():
            batch.bank = (self.module.encode_a(batch.a), self.module.encode_b(batch.b))

    def on_optimizer_step(self, trainer) -> None:
        update_momentum(self.module, trainer.model, self.momentum)


class ModelAfterStep(Callback):
    """The model contract's ``after_optimizer_step()`` after each optimizer step taken."""

    def on_optimizer_step(self, trainer) -> None:
        trainer.model.after_optimizer_step()


class StalenessLog(Callback):
    """Every ``every`` epochs (rank 0): the base loss's rate error against a frozen snapshot of
    the training set (``GammaContrastiveLoss.staleness``), as a ``split: staleness`` record."""

    def __init__(self, loss, every: int, batch_size: int):
        self.loss, self.every, self.batch_size = loss, every, batch_size

    def on_epoch_end(self, trainer) -> None:
        if not (trainer.epoch % self.every == 0 and trainer.is_main):
            return
        was_training = trainer.model.training
        za, zb = trainer.encode_train_set()
        stats = self.loss.staleness(za, zb, trainer.model.scale().detach().float(), batch_size=self.batch_size,
                                    seed=trainer.epoch)
        trainer.model.train(was_training)
        trainer.log({"step": trainer.step, "epoch": trainer.epoch, "split": "staleness", **stats})


def default_callbacks(config, model: nn.Module, objective) -> list[Callback]:
    """The callbacks a run needs, from what its model and its objective's base loss declare: the
    model's after-step update, candidate refresh, momentum bank, staleness log (in this order: the
    order the loop calls them)."""
    from plait.losses.base import ContrastiveLoss

    base = objective.base if isinstance(objective.base, ContrastiveLoss) else None
    embed_dim = config.model.embed_dim
    callbacks: list[Callback] = [ModelAfterStep()]
    if base is not None and base.reads_candidates:
        callbacks.append(CandidateRefresh(base, embed_dim))
    if config.train.bank_momentum:
        if base is None or not base.uses_memory_bank(embed_dim):  # auto resolves by the bank's size: known only now
            raise ValueError("train.bank_momentum needs the gamma loss with a memory bank (loss.options.estimator: memory)")
        callbacks.append(MomentumBank(model, config.train.bank_momentum))
    if base is not None and base.reports_staleness and config.train.staleness_every_epochs:
        callbacks.append(StalenessLog(base, config.train.staleness_every_epochs, config.data.batch_size))
    return callbacks
