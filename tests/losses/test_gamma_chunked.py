"""The gamma loss with its in-batch sums computed block by block from the features
(``batch_chunk_size``): equal to the dense logits (``batch_chunk_size=None``) in value, gradient
(features and logit scale) and state, in float64, for every estimator, mode, duplicates and the
ema slope; and the blockwise kernel's means (the slope) against a dense formula."""

import math

import pytest
import torch

from plait.losses import GammaContrastiveLoss, _logsumexp
from plait.losses._batch import PairBatch
from plait.losses._logsumexp import pair_logsumexp

TOL = dict(atol=1e-10, rtol=1e-10)
STORED = dict(atol=1e-6, rtol=1e-6)  # log_z, slope and scale_at are stored in float32


@pytest.fixture
def always_chunked(monkeypatch):
    """Small batches take the chunked path too (the loss uses the dense one up to DENSE_ROWS rows)."""
    monkeypatch.setattr(_logsumexp, "DENSE_ROWS", 0)


@pytest.fixture(params=["auto", "exact"])
def kernel_path(request, monkeypatch):
    """"auto": one common shift where the logits' range allows it; "exact": every line shifted
    by its own maximum (low temperatures in float32)."""
    if request.param == "exact":
        monkeypatch.setattr(_logsumexp, "_common_shift", lambda *args: None)
    return request.param


def _data(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return a, a + 0.6 * torch.randn(n, dim, generator=g, dtype=torch.float64)


def _indices(n, batch, duplicates, steps, seed):
    g = torch.Generator().manual_seed(seed)
    if not duplicates:
        return [torch.randperm(n, generator=g)[:batch] for _ in range(steps)]
    out = [torch.randint(batch // 2, (batch,), generator=g) for _ in range(steps)]
    assert all(torch.unique(i).numel() < batch for i in out)
    return out


def _steps(loss, features_a, features_b, scale, indices, estimator):
    """(value, grad a, grad b, grad scale, state...) after each training step."""
    out = []
    for step, index in enumerate(indices):
        a = features_a[index].clone().requires_grad_(True)
        b = features_b[index].clone().requires_grad_(True)
        options = {"candidates": (features_a, features_b)} if estimator == "exact" else {}
        value = loss(a, b, scale * (1 + 0.1 * step), index=index, **options)
        grads = torch.autograd.grad(value, (a, b, scale))
        out.append((value.detach(), *grads, {k: v.clone() for k, v in loss.state_dict().items()},
                    {k: v.clone() for k, v in loss.stats.items()}))
    return out


def _assert_same(got, want):
    for x, y in zip(got[:4], want[:4]):
        torch.testing.assert_close(x, y, **TOL)
    for name, y in want[4].items():
        x = got[4][name]
        if y.is_floating_point():
            torch.testing.assert_close(x, y, **(TOL if y.dtype == torch.float64 else STORED))
        else:
            assert torch.equal(x, y), name
    for name, y in want[5].items():
        torch.testing.assert_close(got[5][name], y, atol=1e-9, rtol=1e-9)


CONFIGS = [
    dict(estimator="ema"),
    dict(estimator="ema", shape=2.0, gamma_decay_visits=2),
    dict(estimator="exact"),
    dict(estimator="exact", anchor_gradient="table"),
    dict(estimator="memory"),
    dict(estimator="memory", anchor_gradient="table", memory_candidates=25),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("duplicates", [False, True])
def test_chunked_equals_dense(always_chunked, kernel_path, config, mode, duplicates):
    n, batch = 40, 14
    features = _data(n, 5, seed=batch + duplicates)
    indices = _indices(n, batch, duplicates, 3, seed=7)
    results = []
    for chunk in (4, None):
        loss = GammaContrastiveLoss(n, temperature=0.2, mode=mode, batch_chunk_size=chunk, **config)
        scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        results.append(_steps(loss, *features, scale, indices, config["estimator"]))
    for got, want in zip(*results):
        _assert_same(got, want)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("temperature", [0.01, 0.5])
def test_log_partition_and_slope_chunked_equal_dense(always_chunked, kernel_path, mode, duplicates, temperature):
    """PairBatch.log_partition of a chunked batch against the dense logits, with means=True (the
    ema slope), for the gamma weights, negatives only and positives only."""
    batch = 11
    a, b = (x.requires_grad_(True) for x in _data(batch, 4, seed=3))
    scale = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    index = torch.arange(batch).remainder(7) if duplicates else torch.arange(batch)
    g = torch.Generator().manual_seed(1)
    for weights in ((1 / 50, 49 / 50), (0.0, 1.0), (1.0, 0.0)):
        chunked = PairBatch.build(a, b, scale, index, mode, chunk_size=3)
        dense = PairBatch.build(a, b, scale, index, mode)
        got, want = chunked.log_partition(*weights, means=True), dense.log_partition(*weights, means=True)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, **TOL)
        assert not got[1].requires_grad
        w = torch.randn(got[0].shape, generator=g, dtype=torch.float64)
        got_grads = torch.autograd.grad((got[0] * w).sum() + chunked.positive.sum(), (a, b, scale))
        want_grads = torch.autograd.grad((want[0] * w).sum() + dense.positive.sum(), (a, b, scale))
        for x, y in zip(got_grads, want_grads):
            torch.testing.assert_close(x, y, **TOL)
        assert chunked._logits is None  # never formed
        torch.testing.assert_close(chunked.negative_counts(), dense.negative_counts(), atol=0, rtol=0)


@pytest.mark.parametrize("rows,columns,chunk", [(7, 7, 2), (13, 9, 5), (9, 13, 13), (20, 20, 64)])
@pytest.mark.parametrize("temperature", [0.01, 0.2])
@pytest.mark.parametrize("want", ["both", "rows", "columns"])
def test_pair_logsumexp_means_match_dense(kernel_path, rows, columns, chunk, temperature, want):
    """The means: sum_c softmax(s + delta)_rc * s_rc (s without the deltas), entries repeated and removed."""
    g = torch.Generator().manual_seed(rows * columns)
    a = torch.randn(rows, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(columns, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    n = min(rows, columns)
    r, c = torch.randint(rows, (n,), generator=g), torch.randint(columns, (n,), generator=g)
    value = torch.randn(n, generator=g, dtype=torch.float64)
    value[::3] = -math.inf
    r, c, value = torch.cat([r, r[:2]]), torch.cat([c, c[:2]]), torch.cat([value, value.new_tensor([0.4, -1.1])])
    out = pair_logsumexp(a, b, scale, (r, c, value), rows=want != "columns", columns=want != "rows", chunk_size=chunk,
                         picks="diagonal" if rows == columns else None, means=True)
    assert len(out) == 5
    logits = scale * a @ b.T
    weighted = logits.index_put((r, c), value, accumulate=True)
    lse = torch.logsumexp(weighted, 1), torch.logsumexp(weighted, 0)
    means = ((weighted - lse[0][:, None]).exp() * logits).sum(1), ((weighted - lse[1][None, :]).exp() * logits).sum(0)
    for k, wanted in enumerate((want != "columns", want != "rows")):
        if not wanted:
            assert out[k] is None and out[3 + k] is None
            continue
        torch.testing.assert_close(out[k], lse[k], **TOL)
        torch.testing.assert_close(out[3 + k], means[k].detach(), **TOL)
        assert not out[3 + k].requires_grad
    got = sum(x.sum() for x in (out[0], out[1]) if x is not None)
    wanted_sum = sum(x.sum() for x, w in zip(lse, (want != "columns", want != "rows")) if w)
    for x, y in zip(torch.autograd.grad(got, (a, b, scale)), torch.autograd.grad(wanted_sum, (a, b, scale))):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_default_switches_to_chunks_past_dense_rows(mode):
    """Without the monkeypatch: dense (bit for bit the batch_chunk_size=None loss) up to
    DENSE_ROWS rows, chunked past them, equal to rounding."""
    dense_rows = _logsumexp.DENSE_ROWS
    for batch, exact in ((dense_rows if mode == "bimodal" else dense_rows // 2, True),
                         (dense_rows + 3 if mode == "bimodal" else dense_rows // 2 + 3, False)):
        features = _data(batch + 10, 4, seed=batch)
        index = torch.arange(batch).remainder(batch - 5)
        results = []
        for chunk in (40, None):
            loss = GammaContrastiveLoss(batch + 10, temperature=0.1, mode=mode, estimator="ema", batch_chunk_size=chunk)
            scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
            results.append(_steps(loss, *features, scale, [index, index.flip(0)], "ema"))
        for got, want in zip(*results):
            if exact:
                assert all(torch.equal(x, y) for x, y in zip(got[:4], want[:4]))
                assert all(torch.equal(got[4][k], v) for k, v in want[4].items())
            else:
                _assert_same(got, want)
                assert not torch.equal(got[1], want[1])  # the chunked path did run


@pytest.mark.parametrize("config", [dict(estimator="ema"), dict(estimator="memory", anchor_gradient="table"),
                                    dict(estimator="memory", mode="unimodal")], ids=["ema", "memory-table", "memory-unimodal"])
def test_no_batch_by_batch_tensor_is_kept_for_backward(config):
    """Everything autograd saves for the backward is O(B * chunk + B d): at B = 300, chunk 16, no
    saved tensor has a tenth of the 300 x 300 entries of the logit matrix."""
    batch = 300
    a, b = (x.float().requires_grad_(True) for x in _data(batch, 8, seed=4))
    loss = GammaContrastiveLoss(2000, batch_chunk_size=16, chunk_size=16, **config)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        value = loss(a, b, index=torch.arange(batch).remainder(290))
    value.backward()
    assert sizes and max(sizes) < batch * batch / 10


def test_non_finite_rows_keep_the_state_as_dense(always_chunked):
    features = _data(20, 3, seed=6)
    features[0][2, 1] = float("nan")
    states = []
    for chunk in (3, None):
        loss = GammaContrastiveLoss(20, estimator="ema", batch_chunk_size=chunk)
        value = loss(*features, index=torch.arange(20))
        assert torch.isnan(value)
        states.append(loss.state_dict())
    for name, x in states[0].items():
        assert torch.equal(x.nan_to_num(), states[1][name].nan_to_num()), name


def test_batch_chunk_size_is_checked():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            GammaContrastiveLoss(10, batch_chunk_size=bad)
    assert GammaContrastiveLoss(10, batch_chunk_size=None).batch_chunk_size is None
