import math

import pytest
import torch

from plait.losses import SogCLRLoss, generalized_contrastive_loss
from tests.losses.reference import log_zbatch_loop


def _pairs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_first_full_batch_equals_generalized_loss(mode):
    a, b = _pairs(9, 4)
    a.requires_grad_(True)
    b.requires_grad_(True)
    value = SogCLRLoss(9, temperature=0.2, mode=mode)(a, b, torch.arange(9))
    reference = generalized_contrastive_loss(a, b, 0.2, mode=mode)
    assert value.item() == pytest.approx(reference.item(), abs=1e-9)
    for got, want in zip(torch.autograd.grad(value, (a, b)), torch.autograd.grad(reference, (a, b))):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def _log_g(a, b, index, scale, n, epsilon):
    """log(epsilon + mean_neg exp(s_ij - s_ii)) per anchor (2B,), by brute force."""
    log_neg = log_zbatch_loop(a, b, index, scale, n, positive_weight=0.0, negative_weight=1.0)
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    positive = ((an * bn).sum(1) * scale).repeat(2)
    return torch.log(epsilon + torch.exp(log_neg - positive))


def test_moving_average_update_then_use_by_hand():
    """u <- (1 - gamma) u + gamma g_batch (first visit: g_batch); gradient grad g_batch / u."""
    a, b = _pairs(4, 3, seed=1)
    a.requires_grad_(True)
    gamma, n = 0.3, 20
    loss = SogCLRLoss(n, gamma=gamma, temperature=1.0)
    index = torch.tensor([2, 5, 11, 19])
    u = None
    for step, scale in enumerate([1.0, 2.0, 1.5]):
        value = loss(a, b, index, logit_scale=scale)
        (grad,) = torch.autograd.grad(value, a)
        g = _log_g(a, b, index.tolist(), scale, n, 1 / (n - 1)).exp()
        u = g.detach() if u is None else (1 - gamma) * u + gamma * g.detach()
        torch.testing.assert_close(loss.log_z[:, index].reshape(-1), u.log().float())
        (want,) = torch.autograd.grad((g / u).mean(), a)
        torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-6)  # the state is stored in float32
        assert value.item() == pytest.approx((u.log() + math.log((n - 1) / n)).mean().item(), abs=1e-6)


def test_epsilon_zero_is_the_decoupled_negatives_only_objective():
    a, b = _pairs(6, 3, seed=2)
    loss = SogCLRLoss(50, temperature=0.5, epsilon=0.0)
    value = loss(a, b, torch.arange(6))
    expected = _log_g(a, b, list(range(6)), 2.0, 50, 0.0).mean() + math.log(49 / 50)
    assert value.item() == pytest.approx(expected.item(), abs=1e-9)


def test_duplicates_share_one_state_entry():
    a, b = _pairs(4, 3, seed=3)
    loss = SogCLRLoss(10, gamma=0.5, temperature=1.0)
    loss(a, b, torch.tensor([4, 4, 1, 7]))
    g = _log_g(a, b, [4, 4, 1, 7], 1.0, 10, 1 / 9).reshape(2, 4).exp()
    torch.testing.assert_close(loss.log_z[:, 4], g[:, :2].mean(1).log().float())
    assert loss.visits[4].item() == 1


def test_eval_mode_and_errors():
    a, b = _pairs(4, 3)
    loss = SogCLRLoss(10).eval()
    loss(a, b, torch.arange(4))
    assert loss.visits.sum() == 0 and loss.step.item() == 0
    with pytest.raises(ValueError, match="gamma"):
        SogCLRLoss(10, gamma=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        SogCLRLoss(10, epsilon=-1.0)
    with pytest.raises(ValueError, match="out of range"):
        loss(a, b, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="dataset_size=10.*dataset_size=11"):
        SogCLRLoss(11).load_state_dict(loss.state_dict())
