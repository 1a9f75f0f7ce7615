"""One optimizer step: the forward and backward pass of a batch, then scale, unscale, clip, the
finite check and the update (timm's ``NativeScaler`` in spirit; the fused AdamW of ``build``).

``forward_backward`` runs the model contract's ``training_step`` (under DDP the wrapped one, whose
backward averages the gradients over the ranks; with ``train.grad_cache_chunk`` chunk by chunk,
``plait.grad_cache``) and back-propagates the (scaled) loss outside autocast. ``OptimizerStep``
then unscales (fp16), clips to ``optim.grad_clip`` (or only measures the total norm), decides on
every rank alike whether the step is finite, and steps the optimizer and the lr scheduler.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from plait import distributed, runtime
from plait.types import Batch, StepOutput


@dataclass
class StepResult:
    """``finite``: loss and gradient norm finite on every rank (nothing was updated if not);
    ``taken``: the optimizer updated the parameters (fp16's scaler skips an overflowing step
    itself); ``norm``: the total gradient norm before clipping."""

    finite: bool
    taken: bool
    norm: torch.Tensor


class OptimizerStep:
    """scale -> (backward) -> unscale -> clip -> finite check -> step -> lr schedule.

    Example::

        update = OptimizerStep(optimizer, scheduler, scaler=None, grad_clip=1.0)
        update.scale(loss).backward()
        result = update(loss, model.parameters())
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler | None = None,
                 grad_clip: float = 0.0, world_size: int = 1):
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.grad_clip, self.world_size = float(grad_clip or 0.0), world_size

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate: scaled by fp16's grad scaler, itself otherwise."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def zero_grad(self) -> None:
        """Drop every gradient (set to None)."""
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, loss: torch.Tensor, parameters) -> StepResult:
        """Update from the gradients back-propagated from ``loss``, if finite on every rank."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        parameters = [p for p in parameters if p.grad is not None]
        if self.grad_clip:
            norm = nn.utils.clip_grad_norm_(parameters, self.grad_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in parameters])
        # with fp16's grad scaler an overflowing gradient is routine: the scaler skips that step itself
        finite = (torch.isfinite(loss.detach()) if self.scaler is not None
                  else torch.isfinite(loss.detach()) & torch.isfinite(norm))
        if self.world_size > 1:  # one decision for every rank (a rank's own terms may differ)
            finite = not distributed.any_rank(not bool(finite))
        if not bool(finite):
            self.zero_grad()
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale
            return StepResult(False, False, norm)
        taken = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            taken = self.scaler.get_scale() >= scale  # a lowered scale: the scaler skipped an overflowing step
        else:
            self.optimizer.step()
        self.scheduler.step()
        return StepResult(True, taken, norm)

    def skip(self) -> None:
        """A skipped step still advances the lr schedule (and the data position, elsewhere)."""
        with warnings.catch_warnings():  # a skipped first step: "lr_scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()


def forward_backward(model: nn.Module, step_module: nn.Module, batch: Batch, objective: nn.Module, *, device: torch.device,
                     amp_dtype: torch.dtype | None, grad_cache_chunk: int, scale_loss, world_size: int = 1) -> StepOutput:
    """The model contract's step on ``batch`` and its backward; returns the step's ``StepOutput``.

    ``step_module`` is the model's step as a module (``distributed.TrainingStep``, DDP-wrapped under
    torchrun, ``world_size`` > 1); one process calls ``model.training_step`` itself. Forward passes run in the autocast
    region of ``amp_dtype``, backward passes outside it, as torch recommends."""
    if grad_cache_chunk:
        from plait.grad_cache import grad_cache_step

        no_sync = getattr(step_module, "no_sync", contextlib.nullcontext)  # DDP's, or nothing in one process

        def features(part: Batch):
            with runtime.autocast(device, amp_dtype):
                return step_module(part, None)

        return grad_cache_step(features, batch, objective, grad_cache_chunk, no_sync=no_sync, scale_loss=scale_loss)
    with runtime.autocast(device, amp_dtype):
        if world_size > 1:
            out = step_module(batch, objective)
        else:  # one process: the model itself, no wrapper in the way
            out = model.training_step(batch, objective)
    scale_loss(out.loss).backward()
    return out
