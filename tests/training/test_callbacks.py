"""Which callbacks a run gets (from what its model and loss declare), and that the loop calls them."""

import pytest
import torch

from plait.config import load_config
from plait.losses.base import ContrastiveLoss
from plait.training import Callback, CandidateRefresh, ModelAfterStep, MomentumBank, StalenessLog, Trainer


def _trainer(tmp_path, *overrides):
    return Trainer(load_config("tiny", [f"output_dir={tmp_path}", "optim.max_steps=3", *overrides]))


@pytest.mark.parametrize("overrides, kinds", [
    (["loss.name=infonce"], [ModelAfterStep]),
    (["loss.name=sogclr"], [ModelAfterStep]),  # per-sample state, but no candidates and no staleness statistic
    (["loss.options.estimator=exact"], [ModelAfterStep, CandidateRefresh, StalenessLog]),
    (["loss.options.estimator=memory", "train.bank_momentum=0.9", "train.staleness_every_epochs=0"],
     [ModelAfterStep, CandidateRefresh, MomentumBank]),
])
def test_the_callbacks_follow_the_declared_capabilities(tmp_path, overrides, kinds):
    trainer = _trainer(tmp_path, *overrides)
    assert [type(c) for c in trainer.callbacks] == kinds
    assert (trainer.momentum_model is not None) == (MomentumBank in kinds)


def test_the_capabilities_are_declared_on_the_loss_classes():
    from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss

    assert issubclass(InfoNCELoss, ContrastiveLoss) and issubclass(SogCLRLoss, ContrastiveLoss)
    assert GammaContrastiveLoss.reads_candidates and GammaContrastiveLoss.reports_staleness
    assert not (InfoNCELoss.reads_candidates or SogCLRLoss.reads_candidates or SogCLRLoss.reports_staleness)
    gamma = GammaContrastiveLoss(1000, estimator="exact")
    assert gamma.needs_candidates(16) and not gamma.uses_memory_bank(16)
    memory = GammaContrastiveLoss(1000, estimator="memory", bank_refresh_steps=0)
    assert memory.uses_memory_bank(16) and not memory.needs_candidates(16)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_step_start(self, trainer, batch):
        self.calls.append(("start", trainer.step, tuple(batch.index.shape)))

    def on_optimizer_step(self, trainer):
        self.calls.append(("update", trainer.step))

    def on_epoch_end(self, trainer):
        self.calls.append(("epoch", trainer.epoch))


def test_the_loop_calls_a_callback_at_each_step_and_epoch_end(tmp_path):
    trainer = _trainer(tmp_path, "data.batch_size=512", "optim.max_steps=null", "optim.epochs=2", "loss.name=infonce",
                       "train.checkpoint_every_epochs=0")
    recorder = Recorder()
    trainer.callbacks.append(recorder)
    trainer.train_until(trainer.total_steps)
    steps = trainer.steps_per_epoch
    expected = []
    for step in range(2 * steps):
        expected += [("start", step, (512,)), ("update", step)]
        if (step + 1) % steps == 0:
            expected.append(("epoch", (step + 1) // steps))
    assert recorder.calls == expected


def test_a_step_fault_raised_by_a_callback_goes_through_the_fault_policy(tmp_path):
    from plait.training import StepFault

    class Broken(Callback):
        def on_step_start(self, trainer, batch):
            raise StepFault("the bank is broken")

    trainer = _trainer(tmp_path, "train.on_nonfinite=skip", "loss.name=infonce")
    trainer.callbacks.insert(0, Broken())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_until(2)
    assert trainer.skipped_steps == 2 and trainer.scheduler.last_epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    trainer = _trainer(tmp_path / "stop", "loss.name=infonce")
    trainer.callbacks.insert(0, Broken())
    with pytest.raises(ValueError, match="training stopped at step 1: the bank is broken"):
        trainer.train_until(1)
