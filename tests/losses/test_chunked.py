"""The blockwise log-sum-exp from the features (pair_logsumexp) and the chunked InfoNCE and SogCLR:
equal to the unchunked computation in value and gradient (a, b and the logit scale), in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from plait.losses import InfoNCELoss, SogCLRLoss, _logsumexp
from plait.losses._logsumexp import pair_logsumexp

TOL = dict(atol=1e-10, rtol=1e-10)


@pytest.fixture
def always_chunked(monkeypatch):
    """Small batches take the chunked path too (the losses use the dense one below DENSE_ROWS)."""
    monkeypatch.setattr(_logsumexp, "DENSE_ROWS", 0)


@pytest.fixture(params=["auto", "exact"])
def kernel_path(request, monkeypatch):
    """"auto": one common shift where the logits' range allows it (most cases here); "exact":
    every line shifted by its own maximum, as at low temperature in float32."""
    if request.param == "exact":
        monkeypatch.setattr(_logsumexp, "_common_shift", lambda *args: None)
    return request.param


def _features(rows, columns, dim, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    b = torch.randn(columns, dim, generator=g, dtype=torch.float64)
    if rows == columns:
        b = b + 2 * a  # aligned pairs: larger, more varied logits
    return a.requires_grad_(True), b.requires_grad_(True)


def _grads(value, inputs):
    return torch.autograd.grad(value, inputs)


def _entries(kind, rows, columns, seed):
    if kind is None:
        return None
    n = min(rows, columns)
    r = torch.arange(n)
    if kind == "diagonal":
        return r, r, torch.full((n,), -math.inf, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g, dtype=torch.float64)
    values[::3] = -math.inf
    return r.flip(0), torch.randperm(columns, generator=g)[:n], values


@pytest.mark.parametrize("rows,columns,dim,chunk", [(7, 7, 3, 2), (12, 12, 5, 4), (13, 9, 4, 5), (9, 13, 2, 13), (20, 20, 6, 64)])
@pytest.mark.parametrize("entries", [None, "diagonal", "mixed"])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_pair_logsumexp_matches_dense(kernel_path, rows, columns, dim, chunk, entries, temperature):
    a, b = _features(rows, columns, dim, seed=rows + chunk)
    scale = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    spec = _entries(entries, rows, columns, seed=dim)
    g = torch.Generator().manual_seed(0)
    picks = (torch.randint(rows, (5,), generator=g), torch.randint(columns, (5,), generator=g))
    got = pair_logsumexp(a, b, scale, spec, chunk_size=chunk, picks=picks)
    logits = scale * a @ b.T
    picked = logits[picks]
    if spec is not None:
        logits = logits.index_put(spec[:2], spec[2], accumulate=True)
    want = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0), picked
    weights = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in want]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, **TOL)
    got_grads = _grads(sum((x * w).sum() for x, w in zip(got, weights)), (a, b, scale))
    want_grads = _grads(sum((x * w).sum() for x, w in zip(want, weights)), (a, b, scale))
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("rows,columns,picks", [(True, True, None), (True, False, "diagonal"), (False, True, "mixed"),
                                                (False, False, "mixed")])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_pair_logsumexp_gradcheck(kernel_path, rows, columns, picks, chunk):
    a, b = _features(5, 5 if picks == "diagonal" else 4, 3, seed=chunk)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    spec = (torch.tensor([0, 3, 1]), torch.tensor([0, 2, 3]), torch.tensor([-math.inf, 0.7, -1.2], dtype=torch.float64))
    if picks == "mixed":
        picks = (torch.tensor([4, 0, 0, 2]), torch.tensor([1, 0, 3, 1]))

    def f(x, y, s):
        out = pair_logsumexp(x, y, s, spec, rows=rows, columns=columns, chunk_size=chunk, picks=picks)
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradcheck(f, (a, b, scale))


@pytest.mark.parametrize("chunk", [3, 8])
def test_a_retained_graph_gives_the_same_gradient_twice(kernel_path, chunk):
    """The backward overwrites a single kept block; a second backward recomputes it."""
    a, b = _features(8, 8, 4, seed=7)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    rows, columns, picked = pair_logsumexp(a, b, scale, chunk_size=chunk, picks="diagonal")
    value = (rows * torch.arange(8.0, dtype=torch.float64)).sum() + columns.sum() - 3 * picked.sum()
    first = torch.autograd.grad(value, (a, b, scale), retain_graph=True)
    second = torch.autograd.grad(value, (a, b, scale))
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, **TOL)


def _infonce_oracle(a, b, scale, mode):
    """Cross-entropy over the materialised logits, written independently of the loss."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = a.shape[0]
    if mode == "bimodal":
        logits = scale * a @ b.T
        target = torch.arange(n)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    views = torch.cat([a, b])
    logits = scale * views @ views.T - torch.diag(torch.full((2 * n,), math.inf, dtype=a.dtype))
    return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("batch,chunk", [(2, 1), (9, 4), (16, 16), (23, 5), (40, 7)])
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
def test_infonce_chunked_matches_cross_entropy(always_chunked, kernel_path, mode, batch, chunk, temperature):
    a, b = _features(batch, batch, 8, seed=batch)
    scale = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    got = InfoNCELoss(mode=mode, chunk_size=chunk)(a, b, scale)
    want = _infonce_oracle(a, b, scale, mode)
    torch.testing.assert_close(got, want, **TOL)
    for x, y in zip(_grads(got, (a, b, scale)), _grads(want, (a, b, scale))):
        torch.testing.assert_close(x, y, **TOL)
    dense = InfoNCELoss(mode=mode, chunk_size=None)(a, b, scale)
    torch.testing.assert_close(got, dense, **TOL)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_infonce_default_switches_to_chunks_past_dense_rows(mode):
    batch = _logsumexp.DENSE_ROWS + 3
    a, b = _features(batch, batch, 4, seed=1)
    got = InfoNCELoss(temperature=0.05, mode=mode, chunk_size=50)(a, b)
    want = _infonce_oracle(a, b, 20.0, mode)
    torch.testing.assert_close(got, want, **TOL)
    for x, y in zip(_grads(got, (a, b)), _grads(want, (a, b))):
        torch.testing.assert_close(x, y, **TOL)


def test_infonce_single_pair_is_zero():
    a, b = _features(1, 1, 4, seed=2)
    value = InfoNCELoss()(a, b)
    assert value.item() == 0.0
    assert all((g == 0).all() for g in _grads(value, (a, b)))


def _sogclr_steps(loss, a, b, scale, indices):
    """Values, gradients (a, b, scale) and the state after each of several training steps."""
    out = []
    for index in indices:
        value = loss(a, b, scale, index=index)
        out.append((value, *_grads(value, (a, b, scale)), loss.log_z.clone(), loss.visits.clone()))
    return out


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("batch,chunk,temperature", [(6, 4, 0.01), (17, 5, 0.1), (24, 24, 0.5)])
def test_sogclr_chunked_matches_dense(always_chunked, kernel_path, mode, duplicates, batch, chunk, temperature):
    a, b = _features(batch, batch, 5, seed=batch + duplicates)
    scale = torch.tensor(1 / temperature, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(batch)
    high = batch // 2 if duplicates else 100
    indices = [torch.randint(high, (batch,), generator=g) if duplicates else torch.randperm(high, generator=g)[:batch]
               for _ in range(2)]
    if duplicates:
        assert all(torch.unique(i).numel() < batch for i in indices)
    chunked = SogCLRLoss(100, gamma=0.6, temperature=temperature, mode=mode, chunk_size=chunk)
    dense = SogCLRLoss(100, gamma=0.6, temperature=temperature, mode=mode, chunk_size=None)
    for got, want in zip(_sogclr_steps(chunked, a, b, scale, indices), _sogclr_steps(dense, a, b, scale, indices)):
        for x, y in zip(got[:4], want[:4]):
            torch.testing.assert_close(x, y, **TOL)
        torch.testing.assert_close(got[4], want[4], atol=1e-6, rtol=1e-6)  # log_z is stored in float32
        assert torch.equal(got[5], want[5])


def test_sogclr_default_switches_to_chunks_past_dense_rows():
    batch = _logsumexp.DENSE_ROWS + 5
    a, b = _features(batch, batch, 4, seed=3)
    index = torch.arange(batch).remainder(batch - 7)  # a few duplicates
    values = [SogCLRLoss(batch, temperature=0.05, chunk_size=chunk)(a, b, index=index) for chunk in (32, None)]
    torch.testing.assert_close(values[0], values[1], **TOL)
    for x, y in zip(_grads(values[0], (a, b)), _grads(values[1], (a, b))):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("name", ["infonce", "infonce-unimodal", "sogclr", "sogclr-unimodal"])
def test_no_batch_by_batch_tensor_is_kept_for_backward(name):
    """Everything autograd saves for the backward is O(B * chunk + B d): at B = 300, chunk 16, no
    saved tensor has a tenth of the 300 x 300 entries of the logit matrix."""
    batch, chunk = 300, 16
    a, b = (x.float() for x in _features(batch, batch, 8, seed=4))
    mode = "unimodal" if name.endswith("unimodal") else "bimodal"
    loss = InfoNCELoss(mode=mode, chunk_size=chunk) if name.startswith("infonce") else SogCLRLoss(1000, mode=mode,
                                                                                                  chunk_size=chunk)
    options = {} if name.startswith("infonce") else {"index": torch.arange(batch)}
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        value = loss(a, b, **options)
    value.backward()
    assert sizes and max(sizes) < batch * batch / 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ["infonce", "sogclr"])
def test_low_precision_inputs_match_dense(always_chunked, dtype, name):
    """Half-precision features are computed in float32, as on the dense path."""
    a, b = (x.detach().to(dtype).requires_grad_(True) for x in _features(20, 20, 8, seed=5))
    results = []
    for chunk in (6, None):
        loss = InfoNCELoss(temperature=0.01, chunk_size=chunk) if name == "infonce" else SogCLRLoss(50, temperature=0.01,
                                                                                                    chunk_size=chunk)
        value = loss(a, b) if name == "infonce" else loss(a, b, index=torch.arange(20))
        results.append((value, *_grads(value, (a, b))))
    assert results[0][0].dtype == torch.float32
    for x, y in zip(*results):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x.float(), y.float(), atol=2e-5 * y.abs().max().item(), rtol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_give_nan_and_keep_sogclr_state(always_chunked, bad):
    a, b = (x.detach() for x in _features(8, 8, 3, seed=6))
    a[2, 1] = bad
    assert torch.isnan(InfoNCELoss(chunk_size=3)(a, b))
    loss = SogCLRLoss(10, chunk_size=3)
    assert torch.isnan(loss(a, b, index=torch.arange(8)))
    assert loss.visits.sum() == 0 and torch.equal(loss.log_z, torch.zeros(2, 10))


def test_chunk_size_is_checked():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            InfoNCELoss(chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size"):
            SogCLRLoss(10, chunk_size=bad)
    a = torch.randn(3, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        pair_logsumexp(a, a, torch.tensor(1.0), chunk_size=0)
