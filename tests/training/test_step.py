"""OptimizerStep against a hand-written AdamW step, and forward_backward on one process."""

import copy
import math

import pytest
import torch
from torch import nn

from plait.optim import warmup_cosine
from plait.training.step import OptimizerStep


def _setup(clip: float, lr: float = 0.1):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10, 1))
    return model, OptimizerStep(optimizer, scheduler, grad_clip=clip)


def _loss(model):
    x = torch.arange(8.0).reshape(2, 4) / 7
    return (model(x) ** 2).sum()


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_a_finite_step_equals_clip_then_adamw_then_the_schedule_by_hand(clip):
    model, update = _setup(clip)
    reference = copy.deepcopy(model)
    loss = _loss(model)
    update.zero_grad()
    update.scale(loss).backward()
    result = update(loss.detach(), model.parameters())
    assert result.finite and result.taken

    expected = _loss(reference)
    expected.backward()
    grads = [p.grad.double() for p in reference.parameters()]
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    assert float(result.norm) == pytest.approx(norm, rel=1e-6)  # the norm before clipping
    factor = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
    lr = 0.1 * warmup_cosine(10, 1)(0)  # the lr of the first step
    for p_new, p_old, g in zip(model.parameters(), reference.parameters(), grads):
        g = g * factor
        m, v = 0.1 * g, 0.001 * g * g  # Adam's moments after one step, then bias-corrected
        step = lr * (m / 0.1) / (torch.sqrt(v / 0.001) + 1e-8)
        assert torch.allclose(p_new.double(), p_old.double() - step, atol=1e-6)
    assert update.scheduler.last_epoch == 1


def test_a_nonfinite_loss_updates_nothing_and_clears_the_gradients():
    model, update = _setup(1.0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = _loss(model) * float("nan")
    update.scale(loss).backward()
    result = update(loss.detach(), model.parameters())
    assert not result.finite and not result.taken
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert update.scheduler.last_epoch == 0  # a skipped step advances the schedule only through skip()


def test_skip_advances_the_schedule_without_a_warning(recwarn):
    _, update = _setup(1.0)
    update.skip()
    assert update.scheduler.last_epoch == 1
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
