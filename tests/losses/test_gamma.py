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
    """B = N: every table row is a batch row, masked and recomputed from the batch, so this checks the
    batch path alone (garbage candidates give the same value, asserted). The table path is checked by
    test_exact_table_is_read_for_a_partial_batch and the enumeration over every batch below."""
    a, b = _pairs(12, 5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss = GammaContrastiveLoss(12, temperature=temperature, estimator="exact", shape=INF, mode=mode,
                                anchor_gradient=anchor_gradient)
    value = loss(a, b, index=torch.arange(12), candidates=(a.detach(), b.detach()))
    grads = torch.autograd.grad(value, (a, b))
    reference = generalized_contrastive_loss(a, b, temperature=temperature, mode=mode)
    ref_grads = torch.autograd.grad(reference, (a, b))
    assert value.item() == pytest.approx(reference.item(), abs=1e-9)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    garbage = (torch.randn_like(a), torch.randn_like(b))
    assert loss(a, b, index=torch.arange(12), candidates=garbage).item() == pytest.approx(value.item(), abs=1e-12)


def test_batch_estimate_weights_positive_one_over_n():
    """Zbatch_i = 1/N exp(s_ii) + (N-1)/N mean_{j != i} exp(s_ij), checked by a loop."""
    a, b = _pairs(6, 3)
    loss = GammaContrastiveLoss(100, temperature=0.5, estimator="ema", shape=INF)
    loss.eval()
    value = loss(a, b, index=torch.tensor([3, 17, 42, 0, 99, 5]))
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
    directions = torch.cat([torch.eye(size, dtype=torch.float64)[-1:],
                            torch.randn(2, size, generator=generator, dtype=torch.float64)])
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
    loss = GammaContrastiveLoss(32, temperature=0.5, estimator="ema", gamma=0.02, mode=mode)
    generator = torch.Generator().manual_seed(0)
    for _ in range(600):
        order = torch.randperm(32, generator=generator)
        for chunk in order.split(8):
            loss(a[chunk], b[chunk], index=chunk)
    exact = log_z_exact(a, b, 0.5, mode).float()
    assert (loss.visits == 600).all()
    error = (loss.log_z - exact).abs()
    assert error.mean() < 0.02 and error.max() < 0.1  # a constant-gamma EMA keeps O(sqrt(gamma)) noise


@pytest.mark.parametrize("estimator", ["exact", "memory"])
def test_table_state_is_exact_log_z_once_every_item_is_seen(estimator):
    a, b = _pairs(20, 4, seed=8)
    loss = GammaContrastiveLoss(20, temperature=0.3, estimator=estimator)
    options = {"candidates": (a, b)} if estimator == "exact" else {}
    for _ in range(2):  # the memory bank is full after the first pass
        for chunk in torch.arange(20).split(5):
            loss(a[chunk], b[chunk], index=chunk, **options)
    torch.testing.assert_close(loss.log_z, log_z_exact(a, b, 0.3).float(), atol=1e-5, rtol=0)


def test_eval_mode_leaves_state_untouched():
    a, b = _pairs(8, 3)
    loss = GammaContrastiveLoss(8, estimator="memory").eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss(a, b, index=torch.arange(8))
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
        original(a[index], b[index], index=index, **options)
    restored = GammaContrastiveLoss(16, estimator=estimator, shape=shape, seed=99)
    restored.load_state_dict(original.state_dict())
    for index in batches[6:]:
        x = original(a[index], b[index], index=index, **options)
        y = restored(a[index], b[index], index=index, **options)
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
        GammaContrastiveLoss(10)(a, b, index=index)


def test_bad_features_and_options_raise():
    a, b = _pairs(4, 3)
    loss = GammaContrastiveLoss(10)
    with pytest.raises(ValueError, match="features_a has shape \\(4, 3\\) but features_b has shape \\(4, 2\\)"):
        loss(a, b[:, :2], index=torch.arange(4))
    with pytest.raises(ValueError, match="needs candidates"):
        GammaContrastiveLoss(10, estimator="exact")(a, b, index=torch.arange(4))
    with pytest.raises(ValueError, match="only used by estimator='exact'"):
        loss(a, b, index=torch.arange(4), candidates=(a, b))
    with pytest.raises(ValueError, match="candidates must have shape \\(10, 3\\)"):
        GammaContrastiveLoss(10, estimator="exact")(a, b, index=torch.arange(4), candidates=(a, b))
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
    value = loss(a, b, index=torch.tensor(index))
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
    loss(a, b, index=torch.tensor(index))
    log_zb = log_zbatch_loop(a, b, index, 2.0, 10).reshape(2, 4)
    expected_1 = torch.logsumexp(log_zb[:, [0, 2]], dim=1) - math.log(2)  # log of the mean of the twins' Zbatch
    torch.testing.assert_close(loss.log_z[:, 1], expected_1.float())
    torch.testing.assert_close(loss.log_z[:, 6], log_zb[:, 1].float())
    assert loss.visits.tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 0, 0]


def _tilted_mean_cosine_loop(a, b, scale, n):
    """(2, B) sum_j p_ij cos_ij with p_ij proportional to w_j exp(scale cos_ij), w = 1/n on the positive and
    (n-1)/n/(B-1) on each negative: d log Zbatch_i / d scale, one anchor at a time (bimodal, distinct)."""
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    size = a.shape[0]
    out = torch.zeros(2, size, dtype=a.dtype)
    for d, (x, y) in enumerate(((an, bn), (bn, an))):
        for i in range(size):
            cos = torch.stack([x[i] @ y[j] for j in range(size)])
            w = torch.tensor([1.0 / n if j == i else (n - 1.0) / n / (size - 1) for j in range(size)], dtype=a.dtype)
            p = w * torch.exp(scale * cos)
            out[d, i] = (p * cos).sum() / p.sum()
    return out


def test_constant_gamma_ema_by_hand_over_a_moving_model():
    """First visit copies Zbatch; later visits: Zhat <- (1 - gamma) Zhat(s) + gamma Zbatch, where the old entry is
    first carried from its scale s0 to the current s by log Zhat(s) = log Zhat(s0) + (s - s0) slope, and the slope is
    itself averaged with weight gamma. The features and the scale move between visits."""
    x, y = _pairs(4, 3, seed=6)
    noise = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gamma, n = 0.3, 4
    loss = GammaContrastiveLoss(n, temperature=1.0, estimator="ema", gamma=gamma)
    z_hat = slope = s0 = None
    for step in range(6):
        scale = 1.0 + 0.4 * step
        a, b = x + 0.2 * step * noise[0], y + 0.2 * step * noise[1]
        loss(a, b, scale, index=torch.arange(n))
        z_batch = log_zbatch_loop(a, b, [0, 1, 2, 3], scale, n).reshape(2, n).exp()
        m = _tilted_mean_cosine_loop(a, b, scale, n)
        if z_hat is None:
            z_hat, slope = z_batch, m
        else:
            carried = z_hat * torch.exp((scale - s0) * slope)
            z_hat, slope = (1 - gamma) * carried + gamma * z_batch, (1 - gamma) * slope + gamma * m
        s0 = scale
    torch.testing.assert_close(loss.log_z, z_hat.log().float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.slope, slope.float(), atol=1e-5, rtol=1e-5)
    assert torch.all(loss.scale_at == s0)


def test_gamma_schedule_decays_from_one_to_gamma_by_cosine():
    loss = GammaContrastiveLoss(10, estimator="ema", gamma=0.2, gamma_decay_visits=4)
    got = loss.gamma_for(torch.tensor([2, 3, 4, 5, 6, 50])).tolist()
    want = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3, 4, 4, 4)]
    assert got == pytest.approx(want, abs=1e-12)
    assert GammaContrastiveLoss(10, gamma=0.7).gamma_for(torch.tensor([2, 9])).tolist() == [0.7, 0.7]


def test_scale_correction_matches_z_recomputed_at_the_new_scale():
    """A state written at scale s0 (full batch: Zbatch = Z exactly), read at s1: the corrected entry is close to
    log Z(s1) recomputed from the features, far closer than the uncorrected one."""
    a, b = _pairs(24, 6, seed=12)
    loss = GammaContrastiveLoss(24, estimator="ema")
    loss(a, b, 5.0, index=torch.arange(24))
    for s1 in (4.0, 5.5, 6.0):
        truth = log_z_exact(a, b, 1.0 / s1)
        corrected = loss._ema_estimate(torch.arange(24), torch.tensor(s1, dtype=torch.float64), truth)
        uncorrected_error = (loss.log_z.double() - truth).abs().max()
        corrected_error = (corrected - truth).abs().max()
        assert uncorrected_error > 0.1
        assert corrected_error < 0.15 * uncorrected_error, (s1, corrected_error, uncorrected_error)
        # the public statistic reports the same error
        stats = loss.staleness(a, b, s1)
        assert stats["staleness_log_error"] == pytest.approx((corrected - truth).abs().mean().item(), rel=1e-4)


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
        loss(a[chunk], b[chunk], index=chunk)
    for chunk in torch.arange(200).split(20):
        loss(a[chunk], b[chunk], index=chunk)
    error = (loss.log_z - log_z_exact(a, b, 0.5).float()).abs()
    assert error.mean() < 0.05 and error.max() < 0.3


def test_stats_report_state_age():
    a, b = _pairs(8, 3)
    loss = GammaContrastiveLoss(8)
    loss(a[:4], b[:4], index=torch.arange(4))
    loss(a[4:], b[4:], index=torch.arange(4, 8))
    loss(a[:4], b[:4], index=torch.arange(4))
    assert loss.stats["state_age"].item() == 2.0
    assert loss.step.item() == 3


def test_state_on_another_device_is_named():
    loss = GammaContrastiveLoss(10)
    loss.log_z = loss.log_z.to("meta")
    with pytest.raises(ValueError, match="state on meta but the features are on cpu; move the loss"):
        loss(*_pairs(4, 3), index=torch.arange(4))


# ------------------------------------------------------------------ the memory bank against the exact table
def _memory_with_full_bank(a, b, temperature, anchor_gradient, mode="bimodal"):
    loss = GammaContrastiveLoss(a.shape[0], temperature=temperature, estimator="memory", anchor_gradient=anchor_gradient,
                                mode=mode)
    loss.refresh_bank(a.detach(), b.detach())
    return loss


@pytest.mark.parametrize("anchor_gradient", ["batch", "table"])
@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_memory_with_a_full_current_bank_equals_exact(anchor_gradient, mode):
    a, b = _pairs(10, 4, seed=13)
    a.requires_grad_(True)
    b.requires_grad_(True)
    index = torch.tensor([7, 2, 5, 0])
    memory = _memory_with_full_bank(a, b, 0.3, anchor_gradient, mode)
    exact = GammaContrastiveLoss(10, temperature=0.3, estimator="exact", anchor_gradient=anchor_gradient, mode=mode)
    v_memory = memory(a[index], b[index], index=index)
    v_exact = exact(a[index], b[index], index=index, candidates=(a.detach(), b.detach()))
    assert v_memory.item() == pytest.approx(v_exact.item(), abs=1e-12)
    for g_m, g_e in zip(torch.autograd.grad(v_memory, (a, b)), torch.autograd.grad(v_exact, (a, b))):
        torch.testing.assert_close(g_m, g_e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_exact_table_is_read_for_a_partial_batch(mode):
    """B < N, so the table rows of the other items count: the value equals the generalised loss of the batch
    anchors, and garbage in the table changes it (a full batch would mask the whole table away)."""
    a, b = _pairs(9, 4, seed=14)
    index = torch.tensor([1, 4, 8])
    loss = GammaContrastiveLoss(9, temperature=0.4, estimator="exact", mode=mode)
    value = loss(a[index], b[index], index=index, candidates=(a, b))
    truth = log_z_exact(a, b, 0.4, mode)[:, index]
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    positive = (an[index] * bn[index]).sum(1) / 0.4
    assert value.item() == pytest.approx((truth - positive).mean().item(), abs=1e-10)
    garbage = (torch.randn_like(a), torch.randn_like(b))
    assert abs(loss(a[index], b[index], index=index, candidates=garbage).item() - value.item()) > 1e-3


@pytest.mark.parametrize("estimator,anchor_gradient", [("exact", "batch"), ("exact", "table"), ("memory", "batch")])
def test_gradient_is_unbiased_enumerated_over_every_batch(estimator, anchor_gradient):
    """The mean M-step gradient over all C(6, 3) batches equals the full-data gradient exactly (no sampling)."""
    import itertools

    a, b = _pairs(6, 3, seed=15)
    params = (a.clone().requires_grad_(True), b.clone().requires_grad_(True),
              torch.tensor(2.5, dtype=torch.float64, requires_grad=True))
    total = [torch.zeros_like(p) for p in params]
    batches = list(itertools.combinations(range(6), 3))
    for chosen in batches:
        index = torch.tensor(chosen)
        loss = GammaContrastiveLoss(6, estimator=estimator, anchor_gradient=anchor_gradient)
        options = {}
        if estimator == "exact":
            options["candidates"] = (params[0].detach(), params[1].detach())
        else:
            loss.refresh_bank(params[0].detach(), params[1].detach())
        value = loss(params[0][index], params[1][index], params[2], index=index, **options)
        for acc, g in zip(total, torch.autograd.grad(value, params)):
            acc += g / len(batches)
    full = generalized_contrastive_loss(params[0], params[1], logit_scale=params[2])
    for got, want in zip(total, torch.autograd.grad(full, params)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_exact_reads_a_bank_refreshed_at_this_step_and_refuses_a_stale_one():
    a, b = _pairs(8, 3, seed=16)
    loss = GammaContrastiveLoss(8, estimator="exact")
    assert loss.needs_candidates(3)
    loss.refresh_bank(a, b)
    via_bank = loss(a[:4], b[:4], index=torch.arange(4))
    reference = GammaContrastiveLoss(8, estimator="exact")(a[:4], b[:4], index=torch.arange(4), candidates=(a, b))
    assert via_bank.item() == pytest.approx(reference.item(), abs=1e-12)
    with pytest.raises(ValueError, match=r"refresh_bank\(\) before each step"):
        loss(a[4:], b[4:], index=torch.arange(4, 8))  # the bank is one step old now


def test_memory_refresh_schedule_and_auto_estimator():
    loss = GammaContrastiveLoss(8, estimator="memory", bank_refresh_steps=2)
    assert loss.needs_candidates(3)  # step 0
    a, b = _pairs(8, 3)
    loss(a[:4], b[:4], index=torch.arange(4))
    assert not loss.needs_candidates(3)
    loss(a[4:], b[4:], index=torch.arange(4, 8))
    assert loss.needs_candidates(3)
    assert not GammaContrastiveLoss(8, estimator="memory").needs_candidates(3)
    # auto: the bank (2 N d float32) within the budget -> memory, else ema
    assert GammaContrastiveLoss(1000, bank_budget_mb=1.0).resolved_estimator(128) == "memory"  # 0.98 MiB
    assert GammaContrastiveLoss(1000, bank_budget_mb=1.0).resolved_estimator(256) == "ema"  # 1.95 MiB
    auto = GammaContrastiveLoss(8)
    auto(a[:4], b[:4], index=torch.arange(4))
    assert auto.bank.shape == (2, 8, 3) and auto.in_bank.tolist() == [True] * 4 + [False] * 4


@pytest.mark.parametrize("estimator", ["ema", "memory"])
def test_non_finite_rows_never_reach_the_state(estimator):
    a, b = _pairs(8, 3, seed=17)
    loss = GammaContrastiveLoss(8, estimator=estimator)
    loss(a[:4], b[:4], index=torch.arange(4))
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    bad = a[4:].clone()
    bad[1, 0] = float("nan")
    value = loss(bad, b[4:], index=torch.arange(4, 8))
    assert not torch.isfinite(value)
    after = loss.state_dict()
    for key in ("log_z", "slope", "scale_at", "bank", "visits", "in_bank"):
        assert torch.equal(after[key], before[key]), key
    assert torch.isfinite(loss.log_z).all() and torch.isfinite(loss.bank).all()


def test_max_weight_bounds_the_m_step_weight():
    """A stale rate 1e6 times too small would weight the batch's negatives by 1e6: the weight is capped, so the
    gradient is max_weight times that of log Zbatch, and the statistic counts the capped anchors."""
    a, b = _pairs(4, 3, seed=18)
    a.requires_grad_(True)
    loss = GammaContrastiveLoss(4, temperature=0.5, estimator="ema", max_weight=7.0)
    loss(a.detach(), b, index=torch.arange(4))
    loss.log_z -= math.log(1e6)
    value = loss(a, b, index=torch.arange(4))
    got = torch.autograd.grad(value, a)[0]
    log_zb = log_zbatch_loop(a, b, [0, 1, 2, 3], 2.0, 4)
    an, bn = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    reference = (7.0 * log_zb - ((an * bn).sum(1) * 2.0).repeat(2)).mean()
    torch.testing.assert_close(got, torch.autograd.grad(reference, a)[0], atol=1e-9, rtol=0)
    assert loss.stats["weight_clamped"].item() == 1.0


def test_staleness_of_a_fresh_full_bank_is_zero_and_batch_noise_is_measured():
    a, b = _pairs(12, 4, seed=19)
    loss = _memory_with_full_bank(a, b, 0.5, "batch")
    stats = loss.staleness(a, b, batch_size=4)
    assert stats["staleness_log_error"] == pytest.approx(0.0, abs=1e-12)
    truth = log_z_exact(a, b, 0.5)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    errors = []
    for chunk in order.split(4):
        errors.append((log_zbatch_loop(a[chunk], b[chunk], chunk.tolist(), 2.0, 12).reshape(2, -1) - truth[:, chunk]).abs())
    assert stats["batch_log_error"] == pytest.approx(torch.cat(errors, 1).mean().item(), abs=1e-10)
    # after the features move, the bank is stale and the error is no longer zero
    assert loss.staleness(a + 0.5 * torch.randn_like(a), b)["staleness_log_error"] > 0.01


def test_unimodal_staleness_of_a_fresh_bank_is_zero_and_an_ema_reads_the_exact_rate():
    a, b = _pairs(10, 4, seed=21)
    fresh = _memory_with_full_bank(a, b, 0.5, "batch", mode="unimodal")
    assert fresh.staleness(a, b, batch_size=5)["staleness_log_error"] == pytest.approx(0.0, abs=1e-12)
    ema = GammaContrastiveLoss(10, temperature=0.5, estimator="ema", mode="unimodal")
    ema(a, b, index=torch.arange(10))  # a full batch: the stored rate is the exact one
    stats = ema.staleness(a, b, batch_size=10)
    assert stats["staleness_log_error"] == pytest.approx(0.0, abs=1e-6)
    assert stats["batch_log_error"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(ema.log_z.double(), log_z_exact(a, b, 0.5, "unimodal"), atol=1e-6, rtol=0)


def test_gradcheck_float64():
    """The analytic gradient of the returned value matches finite differences where the value and the M-step
    gradient are the same function: the exact E-step over the whole data (B = N), and a first visit (Zhat = Zbatch).
    (With B < N the M-step gradient deliberately differs from the value's: each batch candidate stands for all.)"""
    a, b = _pairs(5, 3, seed=20)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    for anchor_gradient in ("batch", "table"):
        exact = GammaContrastiveLoss(5, temperature=0.5, estimator="exact", anchor_gradient=anchor_gradient).eval()
        everyone = torch.arange(5)

        def full(x, y, s, exact=exact, everyone=everyone):
            return exact(x, y, s, index=everyone, candidates=(x.detach(), y.detach()))

        assert torch.autograd.gradcheck(full, (a.clone().requires_grad_(True), b.clone().requires_grad_(True), scale))
    index = torch.tensor([1, 3, 4])
    first_visit = GammaContrastiveLoss(8, temperature=0.5, estimator="ema").eval()
    inputs = (a[[0, 1, 2]].clone().requires_grad_(True), b[[0, 1, 2]].clone().requires_grad_(True), scale)
    assert torch.autograd.gradcheck(lambda x, y, s: first_visit(x, y, s, index=index), inputs)
