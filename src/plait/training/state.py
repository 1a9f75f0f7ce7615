"""A run's train state: what a checkpoint holds, how it is restored, and how a checkpoint is
checked before anything is restored from it.

``capture(trainer)`` is the checkpoint: config, input spec, model, optimizer, scheduler, loss
(per-sample state), grad scaler, every random state (global and each augmentation's; under
torchrun every rank's), the training position and the loss window, the callbacks' modules
(``momentum_model``), the data fingerprint and the precision it trained in. ``validate`` checks a
loaded checkpoint's structure, types, value ranges and tensor shapes against this run before
``restore`` loads it: a crafted or corrupt file is refused in one line naming the key.
"""

from __future__ import annotations

import math
import random

import torch
from torch import nn

from plait import distributed, runtime
from plait._checks import is_int, is_number
from plait.config import first_line, to_yaml
from plait.training.callbacks import MomentumBank

PARTS = (("model", dict), ("optimizer", dict), ("scheduler", dict), ("loss", dict), ("rng", dict), ("progress", dict),
         ("config", str))
OPTIONAL_PARTS = ("augment", "scaler", MomentumBank.state_key)
COUNTERS = ("step", "epoch", "batch_in_epoch", "skipped_steps", "consecutive_skips", "window_samples", "metrics_lines")


def capture(trainer) -> dict:
    """The checkpoint of ``trainer`` now (under torchrun every rank takes part: each rank's random state)."""
    augment = trainer.batches.state_dict()
    state = {
        "config": to_yaml(trainer.config),
        "inputs": trainer.inputs,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.update.optimizer.state_dict(),
        "scheduler": trainer.update.scheduler.state_dict(),
        "loss": trainer.loss_fn.state_dict(),
        "scaler": trainer.update.scaler.state_dict() if trainer.update.scaler is not None else {},
        "rng": runtime.rng_state(),
        "augment": augment,
        "progress": {"step": trainer.step, "epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
                     "skipped_steps": trainer.faults.skipped_steps, "consecutive_skips": trainer.faults.consecutive_skips,
                     "metrics_lines": trainer.metrics.lines,
                     # the steps since the last log line: a resumed run logs the same mean loss
                     **trainer.window.state_dict()},
        MomentumBank.state_key: {},  # written (empty) without a momentum bank too: one checkpoint layout
        **{callback.state_key: callback.module.state_dict() for callback in _stateful(trainer)},
        "data": trainer.data_fingerprint,
        "precision": trainer.precision_name,  # the autocast dtype it trained in (a resume keeps it)
    }
    if trainer.world_size > 1:  # every rank's random states, in rank order (``rng``, ``augment``: rank 0's)
        ranks = distributed.all_objects({"rng": runtime.rng_state(), "augment": augment})
        state.update(world_size=trainer.world_size, rng_ranks=[r["rng"] for r in ranks],
                     augment_ranks=[r["augment"] for r in ranks])
    return state


def _stateful(trainer) -> list:
    return [callback for callback in trainer.callbacks if callback.module is not None and callback.state_key]


def restore(trainer, state: dict, source: str = "the checkpoint") -> None:
    """Load a checkpoint's state into ``trainer`` (checked first by :func:`validate`: nothing is
    loaded from a malformed one). A part that still does not load is one ValueError naming it."""
    validate(trainer, state, source)
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as error:  # another tower shape (image size, vocabulary, ...)
        reason = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line or "Missing" in line),
                      str(error).splitlines()[0])
        raise ValueError(f"the checkpoint's model does not fit this config's model: {reason.rstrip(':.')}") from None
    update = trainer.update
    parts = [(callback.state_key, lambda c=callback: c.module.load_state_dict(state[c.state_key]))
             for callback in _stateful(trainer)]
    parts += [
        ("optimizer", lambda: update.optimizer.load_state_dict(state["optimizer"])),
        ("scheduler", lambda: update.scheduler.load_state_dict(state["scheduler"])),
        ("loss", lambda: trainer.loss_fn.load_state_dict(state["loss"])),
        ("scaler", lambda: (update.scaler.load_state_dict(state["scaler"])
                            if update.scaler is not None and state.get("scaler") else None)),
    ]
    for part, load in parts:
        try:
            load()
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
            raise ValueError(f"cannot resume from {source}: its {part} state does not load ({first_line(error)})") from None
    rng, augment = _rank_random_state(trainer, state)
    trainer.batches.load_state_dict(augment)
    if rng is not None:
        runtime.set_rng_state(rng)
    progress = state["progress"]
    trainer.step, trainer.epoch, trainer.batch_in_epoch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
    trainer.faults.skipped_steps = progress.get("skipped_steps", 0)
    trainer.faults.consecutive_skips = progress.get("consecutive_skips", 0)
    trainer.window.load_state_dict(progress)


def _rank_random_state(trainer, state: dict) -> tuple[dict | None, dict]:
    """(global random state, augmentation states) this rank resumes with: its own from a
    checkpoint of the same world size; rank 0's (``rng``, ``augment``) on rank 0 otherwise, and on
    the other ranks none (their fresh seeds): random draws continue bitwise only under the world
    size the checkpoint was written with."""
    ranks = state.get("rng_ranks")
    if isinstance(ranks, list) and len(ranks) == trainer.world_size:
        return ranks[trainer.rank], (state.get("augment_ranks") or [{}] * trainer.world_size)[trainer.rank] or {}
    if trainer.rank == 0:
        return state["rng"], state.get("augment") or {}
    return None, {}


class _Refusal:
    """``refuse(key, what)``: one ValueError naming the checkpoint and the key."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, key: str, what: str) -> None:
        raise ValueError(f"cannot resume from {self.source}: {key} {what} (a corrupt or crafted checkpoint?)")


def validate(trainer, state: dict, source: str = "the checkpoint") -> None:
    """The checkpoint's structure, types and value ranges, before anything is loaded from it: the
    parts a resume needs, each of the right type; the training position consistent with this run
    (step = epoch x steps per epoch + batch, within the schedule, the scheduler at that step);
    every random state loadable; the model's, the loss's, the callbacks' and the optimizer's
    tensors of this run's shapes. A ValueError names the key."""
    refuse = _Refusal(source)
    for key, kind in PARTS:
        if key not in state:
            refuse(key, "is missing")
        if not isinstance(state[key], kind):
            refuse(key, f"is a {type(state[key]).__name__}, not a {kind.__name__}")
    for key in OPTIONAL_PARTS:
        if key in state and not isinstance(state[key], dict):
            refuse(key, f"is a {type(state[key]).__name__}, not a dict")
    _validate_progress(trainer, state, refuse)
    _validate_random_states(state, refuse)
    _validate_modules(trainer, state, refuse)
    _validate_optimizer_state(trainer.update.optimizer, state["optimizer"], refuse)


def _validate_progress(trainer, state: dict, refuse) -> None:
    progress = state["progress"]
    for key in ("step", "epoch", "batch_in_epoch"):
        if key not in progress:
            refuse(f"progress.{key}", "is missing")
    for key in COUNTERS:
        value = progress.get(key, 0)
        if not ((is_int(value) and 0 <= value <= 10**12) or (key == "metrics_lines" and value is None)):
            refuse(f"progress.{key}", f"is {value!r:.40}, not an integer >= 0")
    window = progress.get("window_losses", [])
    if not (isinstance(window, list) and len(window) <= 10**6 and all(is_number(x) and math.isfinite(x) for x in window)):
        refuse("progress.window_losses", "is not a list of finite numbers")
    step, epoch, batch = progress["step"], progress["epoch"], progress["batch_in_epoch"]
    if batch > trainer.steps_per_epoch or step != epoch * trainer.steps_per_epoch + batch or step > trainer.schedule_steps:
        refuse("progress", f"says step {step} at epoch {epoch}, batch {batch}, which does not fit this run's "
                           f"{trainer.steps_per_epoch} steps per epoch and {trainer.schedule_steps}-step schedule")
    last = state["scheduler"].get("last_epoch")
    if last != step:
        refuse("scheduler.last_epoch", f"is {last!r:.40}, not the step {step}")


def _validate_random_states(state: dict, refuse) -> None:
    ranks, augments = state.get("rng_ranks"), state.get("augment_ranks")
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
        if not (isinstance(saved, dict) and is_int(saved.get("seed")) and ("generator" in saved or "rng" in saved)):
            refuse(f"augment.{side}", "is not an augmentation state")
        try:  # tried on throwaway generators: torch's (images, vectors) or Python's (text)
            if "generator" in saved:
                torch.Generator().set_state(saved["generator"])
            else:
                random.Random().setstate(saved["rng"])
        except (RuntimeError, TypeError, ValueError, AttributeError) as error:
            refuse(f"augment.{side}", f"holds no generator state ({first_line(error)})")


def _validate_modules(trainer, state: dict, refuse) -> None:
    """The model's, the loss's and each stateful callback's saved tensors against this run's."""
    modules = [("model", trainer.model), ("loss", trainer.loss_fn)]
    for callback in _stateful(trainer):
        if not state.get(callback.state_key):
            raise ValueError(f"the checkpoint has no {callback.describes}, but {callback.setting} > 0; resume with the settings "
                             "it was trained with")
        modules.append((callback.state_key, callback.module))
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


def _validate_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, refuse) -> None:
    """The optimizer's saved state: as many groups and parameters as this run's, each state
    tensor of its parameter's shape."""
    groups, current = saved.get("param_groups"), optimizer.param_groups
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
