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
    value = SogCLRLoss(9, temperature=0.2, mode=mode)(a, b, index=torch.arange(9))
    reference = generalized_contrastive_loss(a, b, temperature=0.2, mode=mode)
    assert value.item() == pytest.approx(reference.item(), abs=1e-9)
    for got, want in zip(torch.autograd.grad(value, (a, b)), torch.autograd.grad(reference, (a, b))):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def _log_g(a, b, index, scale, n, epsilon, mode="bimodal"):
    """log(epsilon + mean_neg exp(s_ij - s_ii)) per anchor (2B,), by brute force."""
    log_neg = log_zbatch_loop(a, b, index, scale, n, mode, positive_weight=0.0, negative_weight=1.0)
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
        value = loss(a, b, scale, index=index)
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
    value = loss(a, b, index=torch.arange(6))
    expected = _log_g(a, b, list(range(6)), 2.0, 50, 0.0).mean() + math.log(49 / 50)
    assert value.item() == pytest.approx(expected.item(), abs=1e-9)


def test_duplicates_share_one_state_entry():
    a, b = _pairs(4, 3, seed=3)
    loss = SogCLRLoss(10, gamma=0.5, temperature=1.0)
    loss(a, b, index=torch.tensor([4, 4, 1, 7]))
    g = _log_g(a, b, [4, 4, 1, 7], 1.0, 10, 1 / 9).reshape(2, 4).exp()
    torch.testing.assert_close(loss.log_z[:, 4], g[:, :2].mean(1).log().float())
    assert loss.visits[4].item() == 1


def test_eval_mode_and_errors():
    a, b = _pairs(4, 3)
    loss = SogCLRLoss(10).eval()
    loss(a, b, index=torch.arange(4))
    assert loss.visits.sum() == 0 and loss.step.item() == 0
    with pytest.raises(ValueError, match="gamma"):
        SogCLRLoss(10, gamma=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        SogCLRLoss(10, epsilon=-1.0)
    with pytest.raises(ValueError, match="out of range"):
        loss(a, b, index=torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="dataset_size=10.*dataset_size=11"):
        SogCLRLoss(11).load_state_dict(loss.state_dict())


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("side", [0, 1])
def test_a_nan_row_leaves_the_state_untouched(mode, side):
    """Every anchor's batch estimate includes the NaN candidate, so no item's new estimate is
    finite: log_z keeps every entry bit-for-bit, no visit is counted, and no NaN enters it."""
    a, b = _pairs(6, 3, seed=4)
    loss = SogCLRLoss(10, gamma=0.5, temperature=0.5, mode=mode)
    loss(a, b, index=torch.arange(6))
    log_z, visits, last_step = loss.log_z.clone(), loss.visits.clone(), loss.last_step.clone()
    bad = [a.clone(), b.clone()]
    bad[side][2, 1] = float("nan")
    index = torch.tensor([3, 4, 5, 6, 7, 8])  # 3..5 seen before, 6..8 new
    value = loss(*bad, index=index)
    assert torch.isnan(value)  # reported as NaN; the trainer catches it
    assert torch.equal(loss.log_z, log_z) and not torch.isnan(loss.log_z).any()
    assert torch.equal(loss.visits, visits) and torch.equal(loss.last_step, last_step)
    assert loss.step.item() == 2
    # The next clean batch continues from the old state: u = (1 - gamma) u_old + gamma g for 3..5.
    loss(a, b, index=index)
    g = _log_g(a, b, index.tolist(), 2.0, loss.candidate_count, loss.epsilon, mode).reshape(2, 6).exp()
    old = log_z[:, 3:6].double().exp()
    torch.testing.assert_close(loss.log_z[:, 3:6], (0.5 * old + 0.5 * g[:, :3]).log().float())
    torch.testing.assert_close(loss.log_z[:, 6:9], g[:, 3:].log().float())
    assert loss.visits.tolist() == [1, 1, 1, 2, 2, 2, 1, 1, 1, 0]


def test_single_pair_is_refused():
    a, b = _pairs(1, 3)
    with pytest.raises(ValueError, match="needs at least 2 pairs to estimate"):
        SogCLRLoss(10)(a, b, index=torch.tensor([0]))


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_gradcheck_first_visit(mode):
    """On a first visit u = gbatch, the gradient grad gbatch / u is the derivative of the value."""
    a, b = _pairs(4, 3, seed=5)
    scale = torch.tensor(2.0, dtype=torch.float64)
    loss = SogCLRLoss(7, temperature=0.5, mode=mode).eval()  # eval: every call is a first visit
    index = torch.tensor([0, 5, 2, 6])
    inputs = tuple(x.clone().requires_grad_(True) for x in (a, b, scale))
    assert torch.autograd.gradcheck(lambda x, y, s: loss(x, y, s, index=index), inputs)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_gradcheck_later_visit_uses_the_state(mode, duplicates):
    """After a visit, u = (1 - gamma) u_old + gamma gbatch, so d(value)/dx = mean gamma grad gbatch / u:
    gamma times the returned gradient grad gbatch / u. Checked by gradcheck on
    value + (gamma - 1) * (value - value.detach()), whose autograd gradient is gamma times the loss's."""
    a, b = _pairs(4, 3, seed=6)
    gamma = 0.3
    loss = SogCLRLoss(7, gamma=gamma, temperature=0.5, mode=mode)
    index = torch.tensor([1, 1, 4, 6]) if duplicates else torch.tensor([1, 3, 4, 6])
    loss(a + 0.3, b - 0.2, 1.5, index=index)  # first visit, other features: state != gbatch
    loss.eval()
    assert (loss.visits[index] == 1).all()
    scale = torch.tensor(2.0, dtype=torch.float64)

    def scaled(x, y, s):
        value = loss(x, y, s, index=index)
        return value + (gamma - 1) * (value - value.detach())

    inputs = tuple(x.clone().requires_grad_(True) for x in (a, b, scale))
    assert torch.autograd.gradcheck(scaled, inputs)
    # The state is really used: the value differs from the first-visit (state-free) one.
    fresh = SogCLRLoss(7, gamma=gamma, temperature=0.5, mode=mode).eval()
    assert abs(loss(a, b, scale, index=index).item() - fresh(a, b, scale, index=index).item()) > 1e-3
