import math

import pytest
import torch

from plait.losses import GammaContrastiveLoss, InfoNCELoss, generalized_contrastive_loss
from tests.losses.reference import log_z_exact, log_zbatch_loop

INF = float("inf")


def _pairs(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, x + 0.7 * torch.randn(n, d, generator=g, dtype=dtype)


# ------------------------------------------------------------------ the exact E-step on the full data
@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("anchor_gradient", ["table", "batch"])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_exact_estep_full_batch_equals_generalized_loss(mode, anchor_gradient, temperature):
    a, b = _pairs(12, 5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss = GammaContrastiveLoss(12, temperature=temperature, estimator="exact", shape=INF, mode=mode, anchor_gradient=anchor_gradient)
    value = loss(a, b, torch.arange(12), candidates=(a.detach(), b.detach()))
    grads = torch.autograd.grad(value, (a, b))
    reference = generalized_contrastive_loss(a, b, temperature, mode=mode)
    ref_grads = torch.autograd.grad(reference, (a, b))
    assert value.item() == pytest.approx(reference.item(), abs=1e-9)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_batch_estimate_weights_positive_one_over_n():
    """Zbatch_i = 1/N exp(s_ii) + (N-1)/N mean_{j != i} exp(s_ij), checked by a loop."""
    a, b = _pairs(6, 3)
    loss = GammaContrastiveLoss(100, temperature=0.5, estimator="ema", shape=INF)
    loss.eval()
    value = loss(a, b, torch.tensor([3, 17, 42, 0, 99, 5]))
    log_zb = log_zbatch_loop(a, b, [3, 17, 42, 0, 99, 5], 2.0, 100)  # unvisited: Zhat = Zbatch
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    positive = (an * bn).sum(1) / 0.5
    assert value.item() == pytest.approx((log_zb - positive.repeat(2)).mean().item(), abs=1e-9)


# ------------------------------------------------------------------ unbiasedness at B = 4
def _average_gradient(loss_fn, x, y, batches, batch_size, exact, seed=1):
    """Mean and standard error of the gradient w.r.t. (W_a, W_b, log kappa) over random batches."""
    torch.manual_seed(0)
    dim = x.shape[1]
    w_a = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, dtype=torch.float64)
    w_b = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, dtype=torch.float64)
    params = [w_a.requires_grad_(), w_b.requires_grad_(), torch.tensor(math.log(4.0), dtype=torch.float64, requires_grad=True)]
    generator = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(batches):
        index = torch.randperm(x.shape[0], generator=generator)[:batch_size]
        fa, fb, scale = x @ params[0], y @ params[1], params[2].exp()
        options = {}
        if exact:
            options["candidates"] = ((x @ params[0]).detach(), (y @ params[1]).detach())
        if not isinstance(loss_fn, InfoNCELoss):
            options["index"] = index
        value = loss_fn(fa[index], fb[index], logit_scale=scale, **options)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    full = generalized_contrastive_loss(x @ params[0], y @ params[1], logit_scale=params[2].exp())
    true = torch.cat([g.reshape(-1) for g in torch.autograd.grad(full, params)])
    return torch.stack(grads), true


def _z_scores(grads, true, directions):
    """(mean projected gradient - true projection) / its standard error, per direction."""
    projected = grads @ directions.T  # (batches, k)
    se = projected.std(0) / math.sqrt(grads.shape[0])
    return (projected.mean(0) - true @ directions.T) / se


@pytest.fixture(scope="module")
def toy():
    return _pairs(48, 3, seed=3)


@pytest.mark.parametrize("shape,anchor_gradient", [(1.0, "table"), (INF, "table"), (1.0, "batch")])
def test_exact_estep_gradient_is_unbiased_at_batch_4(toy, shape, anchor_gradient):
    x, y = toy
    loss = GammaContrastiveLoss(48, estimator="exact", shape=shape, anchor_gradient=anchor_gradient, seed=5)
    grads, true = _average_gradient(loss, x, y, batches=3000, batch_size=4, exact=True)
    size = true.numel()
    generator = torch.Generator().manual_seed(0)
    # the logit scale and two fixed random projections of all parameters
    directions = torch.cat([torch.eye(size, dtype=torch.float64)[-1:], torch.randn(2, size, generator=generator, dtype=torch.float64)])
    for z in _z_scores(grads, true, directions):
        assert abs(z.item()) < 3.0, f"gradient off by {z.item():.2f} standard errors"


def test_minibatch_infonce_gradient_is_biased_at_batch_4(toy):
    """The premise of the method: InfoNCE's averaged gradient misses the full-data gradient."""
    x, y = toy
    grads, true = _average_gradient(InfoNCELoss(), x, y, batches=3000, batch_size=4, exact=False)
    z = _z_scores(grads, true, torch.eye(true.numel(), dtype=torch.float64)[-1:])[0]  # the logit scale
    assert abs(z.item()) > 4.0, f"InfoNCE's bias is only {z.item():.1f} standard errors"


# ------------------------------------------------------------------ per-sample state
@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_ema_state_converges_to_exact_log_z_with_frozen_model(mode):
    a, b = _pairs(32, 4, seed=7)
    loss = GammaContrastiveLoss(32, temperature=0.5, estimator="ema", gamma=1e-3, mode=mode)
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        order = torch.randperm(32, generator=generator)
        for chunk in order.split(8):
            loss(a[chunk], b[chunk], chunk)
    exact = log_z_exact(a, b, 0.5, mode).float()
    assert (loss.visits == 400).all()
    torch.testing.assert_close(loss.log_z, exact, atol=0.05, rtol=0)


@pytest.mark.parametrize("estimator", ["exact", "memory"])
def test_table_state_is_exact_log_z_once_every_item_is_seen(estimator):
    a, b = _pairs(20, 4, seed=8)
    loss = GammaContrastiveLoss(20, temperature=0.3, estimator=estimator)
    options = {"candidates": (a, b)} if estimator == "exact" else {}
    for _ in range(2):  # the memory bank is full after the first pass
        for chunk in torch.arange(20).split(5):
            loss(a[chunk], b[chunk], chunk, **options)
    torch.testing.assert_close(loss.log_z, log_z_exact(a, b, 0.3).float(), atol=1e-5, rtol=0)


def test_eval_mode_leaves_state_untouched():
    a, b = _pairs(8, 3)
    loss = GammaContrastiveLoss(8, estimator="memory").eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(a, b, torch.arange(8))
    for key, value in loss.state_dict().items():
        if key != "bank":  # allocated lazily (zeros), never written in eval mode
            torch.testing.assert_close(value, before[key])
    assert loss.bank.abs().sum() == 0


@pytest.mark.parametrize("estimator,shape", [("ema", 1.0), ("memory", 2.0), ("exact", INF)])
def test_state_dict_round_trip_resumes_identically(estimator, shape):
    a, b = _pairs(16, 4)
    options = {"candidates": (a, b)} if estimator == "exact" else {}
    original = GammaContrastiveLoss(16, estimator=estimator, shape=shape, seed=3)
    batches = [torch.randperm(16, generator=torch.Generator().manual_seed(i))[:4] for i in range(12)]
    for index in batches[:6]:
        original(a[index], b[index], index, **options)
    restored = GammaContrastiveLoss(16, estimator=estimator, shape=shape, seed=99)
    restored.load_state_dict(original.state_dict())
    for index in batches[6:]:
        x = original(a[index], b[index], index, **options)
        y = restored(a[index], b[index], index, **options)
        assert x.item() == y.item()
    for (key, value), other in zip(original.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(value, other), key


def test_state_dict_with_other_dataset_size_is_refused():
    saved = GammaContrastiveLoss(10).state_dict()
    with pytest.raises(ValueError, match="dataset_size=10.*dataset_size=12"):
        GammaContrastiveLoss(12).load_state_dict(saved)


@pytest.mark.parametrize(
    "index,match",
    [
        (torch.tensor([0, 1, 2, 10]), "index 10 is out of range for dataset_size=10"),
        (torch.tensor([0, -1, 2, 3]), "index -1 is out of range"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer tensor"),
        (torch.tensor([0, 1, 2]), "shape \\(4,\\)"),
        ([0, 1, 2, 3], "torch.Tensor"),
        (torch.tensor([3, 3, 3, 3]), "single distinct dataset index"),
    ],
)
def test_bad_index_raises(index, match):
    a, b = _pairs(4, 3)
    with pytest.raises(ValueError, match=match):
        GammaContrastiveLoss(10)(a, b, index)


def test_bad_features_and_options_raise():
    a, b = _pairs(4, 3)
    loss = GammaContrastiveLoss(10)
    with pytest.raises(ValueError, match="features_a has shape \\(4, 3\\) but features_b has shape \\(4, 2\\)"):
        loss(a, b[:, :2], torch.arange(4))
    with pytest.raises(ValueError, match="needs candidates"):
        GammaContrastiveLoss(10, estimator="exact")(a, b, torch.arange(4))
    with pytest.raises(ValueError, match="only used by estimator='exact'"):
        loss(a, b, torch.arange(4), candidates=(a, b))
    with pytest.raises(ValueError, match="candidates must have shape \\(10, 3\\)"):
        GammaContrastiveLoss(10, estimator="exact")(a, b, torch.arange(4), candidates=(a, b))
    for kwargs, match in [({"estimator": "queue"}, "estimator"), ({"gamma": 0}, "gamma"), ({"shape": -1}, "shape"),
                          ({"anchor_gradient": "x"}, "anchor_gradient"), ({"memory_candidates": 0}, "memory_candidates")]:
        with pytest.raises(ValueError, match=match):
            GammaContrastiveLoss(10, **kwargs)
    with pytest.raises(ValueError, match="dataset_size"):
        GammaContrastiveLoss(1)


# ------------------------------------------------------------------ duplicate indices in a batch
@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_duplicates_value_and_gradient_match_brute_force(mode):
    """Rows sharing an index are all anchors; for each, the columns carrying its index are its
    positives (weight 1/n shared) and in unimodal mode its same-modality twins are not candidates."""
    a, b = _pairs(5, 3, seed=4)
    a.requires_grad_(True)
    b.requires_grad_(True)
    index = [7, 2, 7, 4, 2]
    n = 50 if mode == "bimodal" else 99
    loss = GammaContrastiveLoss(50, temperature=0.4, estimator="ema", mode=mode).eval()
    value = loss(a, b, torch.tensor(index))
    grads = torch.autograd.grad(value, (a, b))
    # Unvisited ema with shape=inf: u = 1/Zbatch, so the gradient is that of mean(-s_ii + log Zbatch_i).
    log_zb = log_zbatch_loop(a, b, index, 2.5, n, mode)
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    reference = (log_zb - ((an * bn).sum(1) * 2.5).repeat(2)).mean()
    assert value.item() == pytest.approx(reference.item(), abs=1e-9)
    for got, want in zip(grads, torch.autograd.grad(reference, (a, b))):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_duplicates_update_state_once_with_their_mean():
    a, b = _pairs(4, 3, seed=5)
    loss = GammaContrastiveLoss(10, temperature=0.5, estimator="ema")
    index = [1, 6, 1, 3]
    loss(a, b, torch.tensor(index))
    log_zb = log_zbatch_loop(a, b, index, 2.0, 10).reshape(2, 4)
    expected_1 = torch.logsumexp(log_zb[:, [0, 2]], dim=1) - math.log(2)  # log of the mean of the twins' Zbatch
    torch.testing.assert_close(loss.log_z[:, 1], expected_1.float())
    torch.testing.assert_close(loss.log_z[:, 6], log_zb[:, 1].float())
    assert loss.visits.tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 0, 0]


def test_ema_update_rule_by_hand():
    """log Zhat <- log((1 - w) Zhat + w Zbatch) with w = max(gamma, 1/visits)."""
    a, b = _pairs(3, 2, seed=6)
    loss = GammaContrastiveLoss(3, temperature=1.0, estimator="ema", gamma=0.25)
    estimates = []
    for step in range(6):
        scale = 1.0 + 0.3 * step  # a moving model, so every batch estimate differs
        loss(a, b, torch.arange(3), logit_scale=scale)
        estimates.append(log_zbatch_loop(a, b, [0, 1, 2], scale, 3).reshape(2, 3).exp())
    expected = estimates[0]
    for visit, z in enumerate(estimates[1:], start=2):
        w = max(0.25, 1 / visit)
        expected = (1 - w) * expected + w * z
    torch.testing.assert_close(loss.log_z, expected.log().float())


def test_gamma_draws_reproducible_under_seed_and_mean_one_over_zhat():
    loss_a = GammaContrastiveLoss(10, shape=2.0, seed=11)
    loss_b = GammaContrastiveLoss(10, shape=2.0, seed=11)
    log_zhat = torch.full((2, 20000), 0.7)
    draws_a, draws_b = loss_a._draw_log_u(log_zhat), loss_b._draw_log_u(log_zhat)
    assert torch.equal(draws_a, draws_b)
    u = draws_a.exp()
    # Gamma(shape=2, rate=2 Zhat): mean 1/Zhat, variance 1/(2 Zhat^2)
    assert u.mean().item() == pytest.approx(math.exp(-0.7), rel=0.01)
    assert u.var().item() == pytest.approx(math.exp(-1.4) / 2, rel=0.05)


def test_memory_candidates_subsample_is_still_an_estimate_of_z():
    a, b = _pairs(200, 4, seed=9)
    loss = GammaContrastiveLoss(200, temperature=0.5, estimator="memory", memory_candidates=150)
    for chunk in torch.arange(200).split(20):
        loss(a[chunk], b[chunk], chunk)
    for chunk in torch.arange(200).split(20):
        loss(a[chunk], b[chunk], chunk)
    error = (loss.log_z - log_z_exact(a, b, 0.5).float()).abs()
    assert error.mean() < 0.05 and error.max() < 0.3


def test_stats_report_state_age():
    a, b = _pairs(8, 3)
    loss = GammaContrastiveLoss(8)
    loss(a[:4], b[:4], torch.arange(4))
    loss(a[4:], b[4:], torch.arange(4, 8))
    loss(a[:4], b[:4], torch.arange(4))
    assert loss.stats["state_age"].item() == 2.0
    assert loss.step.item() == 3


def test_state_on_another_device_is_named():
    loss = GammaContrastiveLoss(10)
    loss.log_z = loss.log_z.to("meta")
    with pytest.raises(ValueError, match="state on meta but the features are on cpu; move the loss"):
        loss(*_pairs(4, 3), torch.arange(4))
