"""plait.models.momentum.update_momentum: the EMA step against a hand computation, its buffers,
its gradients, and the exact floating-point operations the fingerprints depend on."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import nn

import plait.models.momentum
from plait.models.momentum import update_momentum


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def fill_(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def test_parameters_are_the_ema_by_hand():
    fast = net()
    slow = copy.deepcopy(fast).requires_grad_(False)
    fill_(slow, 1.0)
    fill_(fast, 3.0)
    update_momentum(slow, fast, momentum=0.75)
    for p in slow.parameters():  # 0.75 * 1 + 0.25 * 3 = 1.5, exact in binary
        assert torch.equal(p, torch.full_like(p, 1.5))
    update_momentum(slow, fast, momentum=0.75)
    for p in slow.parameters():  # 0.75 * 1.5 + 0.25 * 3 = 1.875
        assert torch.equal(p, torch.full_like(p, 1.875))
    for p in fast.parameters():  # the online module is only read
        assert torch.equal(p, torch.full_like(p, 3.0))


def test_random_parameters_follow_the_formula_with_the_same_float_operations():
    fast, m = net(), 0.995
    slow = copy.deepcopy(fast).requires_grad_(False)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in slow.parameters()]
    update_momentum(slow, fast, m)
    for old, new, online in zip(before, slow.parameters(), fast.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * online.detach(), rtol=1e-6, atol=1e-7)
        # bitwise: theta_m.mul_(m).add_(theta, alpha=1 - m), the order the project's runs were fingerprinted with
        assert torch.equal(new, old.clone().mul_(m).add_(online.detach(), alpha=1.0 - m))


def test_buffers_are_copied_not_averaged():
    fast = net()
    slow = copy.deepcopy(fast).requires_grad_(False)
    fast.train()(torch.randn(8, 3))  # BatchNorm's running statistics and counter move in the online copy only
    assert not torch.equal(slow[1].running_mean, fast[1].running_mean)
    update_momentum(slow, fast, momentum=0.9)
    for b_slow, b_fast in zip(slow.buffers(), fast.buffers()):
        assert torch.equal(b_slow, b_fast) and b_slow.dtype == b_fast.dtype
    assert int(slow[1].num_batches_tracked) == 1
    assert slow[1].running_mean.data_ptr() != fast[1].running_mean.data_ptr()  # copied, not shared


def test_gradients_are_untouched_and_no_graph_is_built():
    fast = net()
    slow = copy.deepcopy(fast)  # requires_grad left True: the update must still not track it
    fast(torch.randn(4, 3)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in fast.parameters()]
    with torch.enable_grad():
        update_momentum(slow, fast, momentum=0.5)
    for p, grad in zip(fast.parameters(), grads):
        assert torch.equal(p.grad, grad) and p.requires_grad
    for p in slow.parameters():
        assert p.grad is None and p.grad_fn is None and p.is_leaf and p.requires_grad


def test_momentum_zero_copies_one_keeps():
    fast = net()
    slow = copy.deepcopy(fast).requires_grad_(False)
    fill_(slow, 2.0)
    update_momentum(slow, fast, momentum=1.0)
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in slow.parameters())
    update_momentum(slow, fast, momentum=0.0)
    assert all(torch.equal(p, q) for p, q in zip(slow.parameters(), fast.parameters()))


def test_mismatched_modules_and_momentum_out_of_range_are_refused():
    fast = net()
    with pytest.raises(ValueError, match="same structure"):
        update_momentum(nn.Linear(3, 2), fast, 0.9)  # 2 parameters and no buffers against 4 and 3
    slow, odd = nn.Linear(3, 2), nn.Linear(3, 2)
    odd.bias = nn.Parameter(torch.zeros(1))  # its second parameter, (1,), would broadcast silently into (2,)
    before = [p.clone() for p in slow.parameters()]
    with pytest.raises(ValueError, match=r"shape \(2,\) paired with one of shape \(1,\)"):
        update_momentum(slow, odd, 0.9)
    assert all(torch.equal(p, q) for p, q in zip(slow.parameters(), before))  # refused before anything is written
    for momentum in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            update_momentum(copy.deepcopy(fast), fast, momentum)


def test_the_docstring_example_runs():
    assert doctest.testmod(plait.models.momentum, raise_on_error=True).attempted > 0
