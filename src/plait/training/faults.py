"""The fault policy: what a step that cannot be taken does (``train.on_nonfinite``).

A step's loss or gradient may be non-finite, or a feature row may have no direction (all
zeros). With ``stop`` the run raises one ValueError naming the step, the epoch, the batch's
dataset indices and the last good checkpoint (left untouched); with ``skip`` the step is counted
as skipped (no optimizer update; the lr schedule and the data position still advance) until
``MAX_CONSECUTIVE_SKIPS`` in a row, or until the parameters themselves are no longer finite, which
no skipping can recover.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

MAX_CONSECUTIVE_SKIPS = 20  # train.on_nonfinite=skip stops anyway after this many skipped steps in a row


class StepFault(Exception):
    """Raised inside a step (by a callback's ``on_step_start``) for a fault the policy decides on:
    the message says what went wrong, without where."""


def nonfinite_tensor(*modules: nn.Module | None) -> str | None:
    """The name of the first floating-point parameter or buffer of ``modules`` holding a NaN or an
    infinity, or None."""
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
    return None


def degenerate_features(features, index: torch.Tensor) -> str | None:
    """Which item's features in a batch are non-finite or all zero (no direction to normalise), or
    None. (Gathered features, under torchrun, carry the global batch's indices.)"""
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


class FaultPolicy:
    """``stop`` or ``skip`` a faulty step, with the counts a checkpoint keeps.

    ``decide(what, index, position, model, last_good, resumable, on_skip)`` raises (stop, too many
    skips, or parameters no longer finite) or counts the step as skipped and calls ``on_skip()``
    (the lr scheduler's step)."""

    def __init__(self, skip: bool, is_main: bool):
        self.skip = skip
        self.is_main = is_main
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def step_taken(self) -> None:
        """A step was taken: the run of consecutive skips ends."""
        self.consecutive_skips = 0

    def decide(self, what: str, index: torch.Tensor, position: tuple[int, int, int], model: nn.Module,
               last_good: str, resumable: bool, on_skip) -> None:
        """``position``: (step, epoch, batch of the epoch), the step counted from 1; ``last_good``:
        where the last good checkpoint is; ``resumable``: whether there is one to resume from."""
        shown = index.tolist()
        indices = ", ".join(map(str, shown[:8])) + (", ..." if len(shown) > 8 else "")
        step, epoch, batch = position
        where = (f"step {step}: {what} (epoch {epoch}, batch {batch} of the epoch; "
                 f"training-set indices {indices} ({len(shown)} items))")
        broken = nonfinite_tensor(model)
        if broken is not None:
            where += f"; the model's parameters are no longer finite ({broken}): skipping steps cannot recover"
        elif self.skip:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips < MAX_CONSECUTIVE_SKIPS:
                if self.is_main:
                    print(f"plait: skipped {where} (train.on_nonfinite=skip; {self.skipped_steps} skipped so far)",
                          file=sys.stderr)
                on_skip()
                return
            where += (f"; {self.consecutive_skips} consecutive steps were skipped (train.on_nonfinite=skip stops after "
                      f"{MAX_CONSECUTIVE_SKIPS})")
        then = ("resume from it (--resume, possibly with train.on_nonfinite=skip) or start again with a lower optim.lr "
                "(--overwrite)" if resumable else "start again with a lower optim.lr (--overwrite)")
        raise ValueError(f"training stopped at {where}; {last_good}; nothing was saved after the fault: {then}")
