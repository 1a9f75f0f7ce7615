"""The training loop: a thin façade over the parts of ``plait.training``.

    plait train configs/emoji.yaml data.batch_size=32 [--resume]

Each step: a batch (index, a, b) in a resumable seeded order (``plait.data.sampler``) -> views on
the device, augmented (``batches``) -> callbacks' ``on_step_start`` -> the model contract's
``training_step(Batch, objective)`` and its backward (``step.forward_backward``) -> the optimizer
step (``step.OptimizerStep``: unscale, clip, finite check, AdamW, lr schedule) -> callbacks'
``on_optimizer_step``. Logs go to ``metrics.jsonl`` (``metrics``), evaluations to ``eval.json``,
checkpoints to ``checkpoint.pt`` (``state``, atomic), final weights to ``model.safetensors``.
A fault is the fault policy's (``faults``); a resume is ``resume``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from plait import distributed, runtime
from plait.checkpoint import export_weights, save_checkpoint
from plait.config import first_line, to_yaml
from plait.run_dir import check_run_dir, open_run_dir
from plait.training import evaluation, state
from plait.training import resume as resuming
from plait.training.build import RunParts, build_run, schedule_length
from plait.training.callbacks import MomentumBank
from plait.training.faults import FaultPolicy, StepFault, degenerate_features, nonfinite_tensor
from plait.training.metrics import LossWindow, MetricsLog
from plait.training.step import forward_backward
from plait.types import Batch, ObjectiveError


class Trainer(RunParts):
    """A run's parts (``RunParts``, built by ``build.build_run`` from a config) and its loop; it
    runs or resumes the run: ``fit()`` trains to the end of the schedule, saves,
    exports and evaluates; ``train_until(n)`` is the loop alone; ``save()``, ``export()`` and
    ``resume(path)`` are what their names say.

    Example::

        trainer = Trainer(load_config("tiny", ["optim.max_steps=4"]), run_dir="runs/x")
        metrics = trainer.fit()
    """

    def __init__(self, config: DictConfig, run_dir: str | Path | None = None, allow_import: bool = False):
        super().__init__(**vars(build_run(config, allow_import)))
        self.allow_import = allow_import
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.terms: dict = {}  # the named loss terms of the last step taken (model contract)
        self._grad_cache_chunk = int(config.train.grad_cache_chunk)  # an OmegaConf lookup per step costs ~10 us
        self.faults = FaultPolicy(config.train.on_nonfinite == "skip", self.is_main)
        self.window = LossWindow()  # the steps since the last log line (it survives a resume)
        # the run directory (nothing is written into it before fit()) is the metrics log's
        self.metrics = MetricsLog(Path(run_dir or config.output_dir), self.is_main, config.train.tensorboard)
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, step) of the latest save or resume
        self.resumed_from: bool | Path = False  # True: output_dir/checkpoint.pt; a Path: the checkpoint given
        self._fingerprint = None

    # ------------------------------------------------------------------------------ parts and facts
    run_dir = property(lambda self: self.metrics.run_dir, doc="Where the run writes (output_dir unless given).")
    optimizer = property(lambda self: self.update.optimizer, doc="The AdamW optimizer (``update``'s).")
    scheduler = property(lambda self: self.update.scheduler, doc="The warm-up + cosine lr schedule (``update``'s).")
    scaler = property(lambda self: self.update.scaler, doc="fp16's grad scaler, or None (``update``'s).")
    augment = property(lambda self: self.batches.augment, doc="Each side's augmentation (None: not augmented).")
    skipped_steps = property(lambda self: self.faults.skipped_steps, doc="Steps skipped (train.on_nonfinite=skip).")
    consecutive_skips = property(lambda self: self.faults.consecutive_skips, doc="Skipped steps in a row, now.")
    precision_name = property(lambda self: runtime.precision_name(self.amp_dtype, self.param_dtype),
                              doc="fp64, fp32, bf16 or fp16: what a checkpoint records and a resume keeps.")
    periodic_split = property(lambda self: "validation" if self.validation_set is not None else "eval",
                              doc="Where evaluations during training look: the validation split if there is one.")

    @property
    def momentum_model(self) -> torch.nn.Module | None:
        """``train.bank_momentum``'s momentum copy of the model (None without one)."""
        return next((c.module for c in self.callbacks if c.state_key == MomentumBank.state_key), None)

    @property
    def data_fingerprint(self) -> dict:
        """The training set's fingerprint (computed once): a resume checks it."""
        if self._fingerprint is None:
            self._fingerprint = resuming.data_fingerprint(self.train_set)
        return self._fingerprint

    def schedule_length(self, config: DictConfig) -> int:
        """The lr schedule's length in steps under ``config`` (this trainer's data)."""
        return schedule_length(config, self.steps_per_epoch)

    def encode_train_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training item's (z_a, z_b) under the current model, without augmentation or gradient."""
        from plait.evaluate.suite import embed

        za, zb = embed(self.model, self.train_set, self.config.eval.batch_size, self.device)
        return za.to(self.device), zb.to(self.device)

    def log(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl (and TensorBoard); rank 0 only under torchrun."""
        self.metrics.append(record, self.last_good())

    def last_good(self) -> str:
        """Where the last good checkpoint is (for messages after a fault), or that there is none."""
        if self.last_checkpoint is None:
            return "no checkpoint had been written"
        path, step = self.last_checkpoint
        return f"the last good checkpoint is {path} (step {step}), left untouched"

    # ------------------------------------------------------------------------------ one step
    def train_step(self, index, a, b) -> torch.Tensor | None:
        """One optimizer step on a batch; the detached loss, or None for a step skipped for a
        non-finite loss or gradient (``train.on_nonfinite=skip``; with ``stop`` that raises).

        A skipped step makes no optimizer (nor momentum-encoder) update but counts: the scheduler
        steps, so the schedule and the data position stay aligned with the step count. What the
        loss's forward pass wrote into its per-sample state is kept: the losses write only finite
        entries, estimates under the current (unchanged, finite) parameters."""
        batch = Batch(*self.batches.prepare(index, a, b, self.model.provides_augmented))
        try:
            for callback in self.callbacks:  # (every rank alike)
                callback.on_step_start(self, batch)
        except StepFault as fault:
            return self._fault(str(fault), batch.index)
        if not (self.model.training and self.loss_fn.training):  # evaluation switches them off
            self.model.train()
            self.loss_fn.train()
        self.update.zero_grad()
        try:
            out = forward_backward(self.model, self.step_module, batch, self.loss_fn, device=self.device,
                                   amp_dtype=self.amp_dtype, grad_cache_chunk=self._grad_cache_chunk,
                                   scale_loss=self.update.scale, world_size=self.world_size)
        except ObjectiveError as error:  # a feature row with no direction (all zeros) is refused by the loss
            fault = degenerate_features(error.features, batch.index)
            if fault is None:
                raise
            return self._fault(fault, batch.index)
        loss = out.loss.detach()
        result = self.update(loss, self.model.parameters())
        if not result.finite:
            if not bool(torch.isfinite(loss)):
                cause = degenerate_features(out.features, batch.index)
                return self._fault("non-finite loss" + (f" ({cause})" if cause else ""), batch.index)
            return self._fault(f"non-finite gradient (total norm {float(result.norm)}; loss {float(loss):.4g})", batch.index)
        if result.taken:  # momentum encoders follow only the steps the optimizer took
            for callback in self.callbacks:
                callback.on_optimizer_step(self)
        self.faults.step_taken()
        self.terms = out.terms  # the named terms of a step taken (a skipped step's are not logged)
        return loss

    def _fault(self, what: str, index: torch.Tensor) -> None:
        """A step that cannot be taken: the fault policy raises, or counts it as skipped (the
        scheduler still steps)."""
        self.faults.decide(what, index, (self.step + 1, self.epoch, self.batch_in_epoch + 1), self.model, self.last_good(),
                           self.last_checkpoint is not None, self.update.skip)

    # ------------------------------------------------------------------------------ the loop
    def fit(self, overwrite: bool = False) -> dict:
        """Train to the end of the schedule (from where a resumed run stopped), save, export and
        evaluate. A new run refuses an ``output_dir`` holding another run's files, unless
        ``overwrite`` (which deletes them first); temporary files of interrupted writes are removed."""
        failure = None
        if self.is_main:  # under torchrun rank 0 alone checks and writes the run directory
            try:
                open_run_dir(self.run_dir, self.resumed_from, overwrite, to_yaml(self.config), self.write_skipped)
            except (ValueError, OSError) as error:
                failure = error
        message = distributed.broadcast_error(None if failure is None else first_line(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise ValueError(f"rank 0 stopped: {message}")
        self.train_until(self.total_steps)
        return self.finish()

    def finish(self) -> dict:
        """Save, export and run the final evaluation (``plait.training.evaluation.finish``)."""
        return evaluation.finish(self)

    def train_until(self, total_steps: int) -> None:
        """The training loop alone, up to ``total_steps`` steps in all."""
        from plait.runtime import progress_bar

        bar = progress_bar(total_steps, self.config.train.progress and self.is_main, initial=self.step,  # rank 0's, on a terminal
                           desc=self.config.name, unit="step", dynamic_ncols=True)
        try:
            self._loop(total_steps, bar)
        finally:  # a fault or an interrupt leaves no half-drawn bar behind
            bar.close()

    def _loop(self, total_steps: int, bar) -> None:
        log_every, checkpoint_every = int(self.config.train.log_every), int(self.config.train.checkpoint_every_steps or 0)
        self.window.start_clock()
        while self.step < total_steps:
            self.sampler.set_position(self.epoch, self.batch_in_epoch * self.config.data.batch_size)
            for index, a, b in self.loader:
                loss = self.train_step(index, a, b)
                self.step += 1
                self.batch_in_epoch += 1
                self.window.add(loss, len(index))
                bar.update()
                if self.step % log_every == 0 or self.step == total_steps:
                    self._log_window(bar)
                last = self.step >= total_steps
                if last and self.batch_in_epoch == self.steps_per_epoch:  # the last step closed an epoch
                    self._end_epoch()
                if checkpoint_every and self.step % checkpoint_every == 0:
                    self.save()
                if last:
                    break
            else:  # the epoch ran to its end
                self._end_epoch()

    def _log_window(self, bar) -> None:
        record = self.window.record(self.step, self.epoch, self.terms, self.scheduler.get_last_lr()[0],
                                    self.model.scale().item(), self.world_size,
                                    self.faults.skipped_steps if self.faults.skip else None)
        self.log(record)
        if self.window.losses:
            bar.set_postfix(loss=f"{record['loss']:.3f}", samples_per_s=f"{record['samples_per_s']:.0f}")
        self.window.reset()

    def _end_epoch(self) -> None:
        """Count a finished epoch; callbacks (the staleness log), the periodic evaluation and the
        checkpoint as configured (no evaluation after the last step: ``finish`` does it)."""
        train = self.config.train
        self.epoch += 1
        self.batch_in_epoch = 0
        for callback in self.callbacks:
            callback.on_epoch_end(self)
        if (train.eval_every_epochs and self.epoch % train.eval_every_epochs == 0 and self.step < self.total_steps
                and evaluation.has_split(self, self.periodic_split) and self.is_main):  # the others wait at the next collective
            self.log({"step": self.step, "epoch": self.epoch, "split": self.periodic_split,
                      **self.evaluate(write=False, on=self.periodic_split)})
        if train.checkpoint_every_epochs and self.epoch % train.checkpoint_every_epochs == 0:
            self.save()

    def evaluate(self, write: bool, on: str = "test") -> dict:
        """Metrics on the validation split (``on="validation"``) or the test split."""
        return evaluation.evaluate(self, write, on)

    # ------------------------------------------------------------------------------ files
    def _check_finite(self, target: Path) -> None:
        """Refuse to write ``target`` from a model with a non-finite parameter or buffer."""
        broken = nonfinite_tensor(self.model, *(c.module for c in self.callbacks))
        if broken is not None:
            raise ValueError(f"not writing {target}: the model's {broken} is not finite at step {self.step}; {self.last_good()}")

    def save(self) -> Path:
        """Write ``checkpoint.pt`` (atomically; refused for a model that is no longer finite)."""
        path = self.run_dir / "checkpoint.pt"
        self._check_finite(path)
        checkpoint = state.capture(self)  # under torchrun every rank takes part (each rank's random state)
        if self.is_main:
            save_checkpoint(path, checkpoint)
        self.last_checkpoint = (path, self.step)
        return path

    def export(self) -> Path:
        """Write ``model.safetensors`` (atomically; refused for a model that is no longer finite)."""
        path = self.run_dir / "model.safetensors"
        self._check_finite(path)
        return export_weights(self.model, path, to_yaml(self.config), inputs=self.inputs)

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from a checkpoint (default ``output_dir/checkpoint.pt``) made with the same
        settings and the same training data (``plait.training.resume``)."""
        resuming.resume(self, path)

    def load_state(self, checkpoint: dict, source: str = "the checkpoint") -> None:
        """Load a checkpoint's state, checked first (``plait.training.state``)."""
        state.restore(self, checkpoint, source)


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
