"""The E-step parts of the gamma loss (plait.losses.estimators), each on its own, against hand computations and
brute-force loops in float64."""

import copy
import math

import pytest
import torch

from plait.losses import GammaContrastiveLoss
from plait.losses._batch import PairBatch
from plait.losses.estimators import EmaRates, ExactTable, MemoryBank, TableRates, one_side, scan_tables
from tests.losses.reference import log_z_exact

STATE_KEYS = ["log_z", "visits", "last_step", "step", "rng_state", "scale_at", "slope", "bank", "in_bank", "bank_step"]


def _unit(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(a + 0.6 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a, b


def _loss(n, **options):
    return GammaContrastiveLoss(n, **options).double()


# ------------------------------------------------------------------ the parts live on the loss's buffers
@pytest.mark.parametrize("estimator", ["auto", "ema", "exact", "memory"])
def test_parts_keep_the_state_dict_keys_flat_and_in_order(estimator):
    loss = GammaContrastiveLoss(8, estimator=estimator)
    assert list(loss.state_dict()) == STATE_KEYS
    assert [name for name, _ in loss.named_buffers()] == STATE_KEYS
    assert list(loss.children()) == []  # the parts are views, not sub-modules with prefixed keys
    assert isinstance(loss.ema_rates, EmaRates) and isinstance(loss.memory_bank, MemoryBank)
    assert isinstance(loss.exact_table, ExactTable) and isinstance(loss.table_rates, TableRates)


def test_parts_follow_the_loss_through_to_and_deepcopy():
    loss = GammaContrastiveLoss(6, estimator="memory").double()
    assert loss.scale_at.dtype == torch.float64
    a, b = _unit(6, 3)
    loss.refresh_bank(a, b)
    before = loss.bank.clone()
    twin = copy.deepcopy(loss)
    assert twin.memory_bank.owner is twin and twin.ema_rates.owner is twin and twin.table_rates.owner is twin
    twin.memory_bank.refresh(b, a)  # writes the copy's bank only
    assert torch.equal(twin.bank[0], b) and torch.equal(loss.bank, before)


# ------------------------------------------------------------------ EmaRates
def test_ema_update_equals_a_hand_computation():
    """Items 1 (two rows, a revisit), 3 (first visit), 5 (revisit, a non-finite row: nothing written)."""
    loss = _loss(6, estimator="ema", gamma=0.3)
    loss.visits.copy_(torch.tensor([0, 2, 0, 0, 0, 1]))
    loss.log_z.copy_(torch.tensor([[0.0, 1.5, 0, 0, 0, 2.0], [0.0, -0.5, 0, 0, 0, 1.0]], dtype=torch.float64))
    loss.slope.copy_(torch.tensor([[0.0, 0.2, 0, 0, 0, 0.1], [0.0, -0.4, 0, 0, 0, 0.3]], dtype=torch.float64))
    loss.scale_at.copy_(torch.tensor([0.0, 8.0, 0, 0, 0, 9.0], dtype=torch.float64))
    index = torch.tensor([3, 1, 5, 1])
    unique, inverse = torch.unique(index, return_inverse=True)
    log_zbatch = torch.tensor([[0.7, 1.0, 2.0, 2.0], [0.2, -1.0, math.nan, 0.5]], dtype=torch.float64)
    slope = torch.tensor([[0.5, 0.1, 0.2, 0.3], [0.6, 0.2, 0.1, 0.4]], dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)
    new, ok = loss.ema_rates.update(unique, inverse, log_zbatch, slope, scale)
    assert ok.tolist() == [True, True, False]

    weight = 0.3  # gamma_k = gamma, no decay
    for direction in range(2):
        fresh = math.log((math.exp(log_zbatch[direction, 1]) + math.exp(log_zbatch[direction, 3])) / 2)
        carried = [1.5, -0.5][direction] + (10.0 - 8.0) * [0.2, -0.4][direction]
        want = math.log((1 - weight) * math.exp(carried) + weight * math.exp(fresh))
        assert new[direction, 0].item() == pytest.approx(want, abs=1e-12)
        assert new[direction, 1].item() == pytest.approx(log_zbatch[direction, 0].item(), abs=1e-12)  # first visit
        fresh_slope = (slope[direction, 1] + slope[direction, 3]).item() / 2
        want_slope = (1 - weight) * [0.2, -0.4][direction] + weight * fresh_slope
        assert loss.slope[direction, 1].item() == pytest.approx(want_slope, abs=1e-12)
        assert loss.slope[direction, 3].item() == pytest.approx(slope[direction, 0].item(), abs=1e-12)
    assert loss.scale_at.tolist() == [0.0, 10.0, 0.0, 10.0, 0.0, 9.0]  # item 5 kept its entry
    assert loss.slope[:, 5].tolist() == [0.1, 0.3]
    assert loss.log_z[:, 1].tolist() == [1.5, -0.5]  # log_z is the caller's to write


def test_ema_update_without_scale_correction_reads_the_stored_entry():
    loss = _loss(4, estimator="ema", gamma=0.5, scale_correction=False)
    loss.visits.fill_(1)
    loss.log_z.fill_(1.0)
    loss.slope.fill_(5.0)  # would move the entry by 5 * (10 - 0) if it were applied
    index = torch.tensor([0, 2])
    unique, inverse = torch.unique(index, return_inverse=True)
    log_zbatch = torch.full((2, 2), 3.0, dtype=torch.float64)
    new, ok = loss.ema_rates.update(unique, inverse, log_zbatch, torch.zeros(2, 2, dtype=torch.float64),
                                    torch.tensor(10.0, dtype=torch.float64))
    assert ok.all()
    torch.testing.assert_close(new, torch.full((2, 2), math.log(0.5 * math.e + 0.5 * math.e**3), dtype=torch.float64))


@pytest.mark.parametrize("scale_correction", [True, False])
def test_ema_estimate_carries_the_entry_to_the_current_scale(scale_correction):
    loss = _loss(4, estimator="ema", scale_correction=scale_correction)
    loss.visits.copy_(torch.tensor([0, 3, 1, 0]))
    loss.log_z.copy_(torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, -1.0, 0.5, 9.0]], dtype=torch.float64))
    loss.slope.copy_(torch.tensor([[0.0, 0.25, -0.5, 0.0], [0.0, 0.75, 0.1, 0.0]], dtype=torch.float64))
    loss.scale_at.copy_(torch.tensor([0.0, 6.0, 12.0, 0.0], dtype=torch.float64))
    index = torch.tensor([0, 1, 2])
    log_zbatch = torch.tensor([[0.3, 7.0, 7.0], [0.4, 7.0, 7.0]], dtype=torch.float64)
    got = loss.ema_rates.estimate(index, torch.tensor(10.0, dtype=torch.float64), log_zbatch)
    shift = 1.0 if scale_correction else 0.0
    want = [[0.3, 1.0 + shift * 4 * 0.25, 2.0 + shift * -2 * -0.5],
            [0.4, -1.0 + shift * 4 * 0.75, 0.5 + shift * -2 * 0.1]]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)


def test_gamma_schedule_is_constant_or_the_cosine_decay():
    constant = _loss(4, gamma=0.25).ema_rates
    assert constant.gamma_for(torch.tensor([2, 7, 100])).tolist() == [0.25] * 3
    decay = _loss(4, gamma=0.2, gamma_decay_visits=4).ema_rates
    visits = torch.tensor([1, 2, 3, 5, 9])
    want = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min((k - 1) / 4, 1.0))) for k in visits.tolist()]
    got = decay.gamma_for(visits)
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, abs=1e-15)
    assert got[0].item() == 1.0 and got[-1].item() == pytest.approx(0.2, abs=1e-15)


# ------------------------------------------------------------------ MemoryBank
def test_memory_bank_write_averages_duplicated_indices():
    loss = _loss(6, estimator="memory")
    bank = loss.memory_bank
    a, b = _unit(4, 3)
    index = torch.tensor([2, 0, 2, 2])
    unique, inverse = torch.unique(index, return_inverse=True)
    bank.allocate(a)
    assert loss.bank.shape == (2, 6, 3) and loss.bank.dtype == torch.float64
    written = bank.write(unique, inverse, a, b, torch.tensor([True, True]))
    assert written.tolist() == [True, True]
    torch.testing.assert_close(loss.bank[0, 2], (a[0] + a[2] + a[3]) / 3, atol=1e-15, rtol=0)
    torch.testing.assert_close(loss.bank[1, 2], (b[0] + b[2] + b[3]) / 3, atol=1e-15, rtol=0)
    assert torch.equal(loss.bank[0, 0], a[1]) and torch.equal(loss.bank[1, 0], b[1])
    assert loss.in_bank.tolist() == [True, False, True, False, False, False]
    # a row the caller marks not ok (its rate was not finite) is not written
    again = bank.write(unique, inverse, b, a, torch.tensor([False, True]))
    assert again.tolist() == [False, True] and torch.equal(loss.bank[0, 0], a[1])
    torch.testing.assert_close(loss.bank[1, 2], (a[0] + a[2] + a[3]) / 3, atol=1e-15, rtol=0)


def test_memory_bank_write_skips_non_finite_rows():
    loss = _loss(6, estimator="memory")
    a, b = _unit(3, 3)
    b[1, 2] = math.nan  # item 3's row
    index = torch.tensor([5, 3, 1])
    unique, inverse = torch.unique(index, return_inverse=True)
    loss.memory_bank.allocate(a)
    written = loss.memory_bank.write(unique, inverse, a, b, torch.ones(3, dtype=torch.bool))
    assert written.tolist() == [True, False, True]
    assert loss.in_bank.tolist() == [False, True, False, False, False, True]
    assert loss.bank[:, 3].abs().sum() == 0 and torch.equal(loss.bank[0, 5], a[0])


def test_memory_bank_refresh_table_and_dimension_check():
    loss = _loss(5, estimator="memory")
    bank = loss.memory_bank
    a, b = _unit(5, 4)
    assert bank.refreshed_table(torch.float64) is None  # never refreshed
    loss.step.fill_(3)
    bank.refresh(a, b)
    assert int(loss.bank_step) == 3 and loss.in_bank.all()
    table_a, table_b = bank.refreshed_table(torch.float64)
    assert torch.equal(table_a, a) and torch.equal(table_b, b)
    rows_a, rows_b, usable = bank.table(a[:2])
    assert torch.equal(rows_a, a) and torch.equal(rows_b, b) and usable is loss.in_bank
    assert not rows_a.requires_grad
    loss.step.fill_(4)
    assert bank.refreshed_table(torch.float64) is None  # stale: refreshed at another step
    with pytest.raises(ValueError, match="features of dim 4, got dim 3"):
        bank.allocate(torch.zeros(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_memory_bank_estimate_equals_a_loop_over_the_written_rows(mode):
    n_items, scale = 7, 3.0
    loss = _loss(n_items, estimator="memory", mode=mode, chunk_size=3)
    old_a, old_b = _unit(n_items, 4, seed=1)
    loss.memory_bank.refresh(old_a, old_b)
    loss.in_bank[[1, 4]] = False
    a, b = _unit(n_items, 4, seed=2)  # the snapshot: the anchors and positives are current
    got = loss.memory_bank.estimate(a, b, torch.tensor(scale, dtype=torch.float64))
    n = loss.candidate_count
    for i in range(n_items):
        for direction, (anchor, partner) in enumerate(((a[i], b[i]), (b[i], a[i]))):
            tables = [(old_b, old_a)[direction]] if mode == "bimodal" else [(old_b, old_a)[direction], (old_a, old_b)[direction]]
            negatives = [math.exp(scale * float(anchor @ table[j])) for table in tables
                         for j in range(n_items) if j != i and bool(loss.in_bank[j])]
            want = math.log(math.exp(scale * float(anchor @ partner)) / n + (n - 1) / n * sum(negatives) / len(negatives))
            assert got[direction, i].item() == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------ ExactTable
@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_exact_log_partition_equals_the_brute_force_logsumexp(mode, chunk_size):
    a, b = _unit(9, 5)
    loss = _loss(9, estimator="exact", mode=mode, chunk_size=chunk_size, temperature=0.25)
    got = loss.exact_table.log_partition(a, b, torch.tensor(4.0, dtype=torch.float64))
    torch.testing.assert_close(got, log_z_exact(a, b, 0.25, mode), atol=1e-12, rtol=0)
    # and as one logsumexp over the full (N, N) similarity matrix (bimodal: the partner included)
    if mode == "bimodal":
        want = torch.stack([torch.logsumexp(4.0 * a @ b.T, 1), torch.logsumexp(4.0 * b @ a.T, 1)]) - math.log(9)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_exact_table_checks_candidates_or_reads_the_bank_refreshed_this_step():
    loss = _loss(5, estimator="exact")
    a, b = _unit(5, 3)
    table_a, table_b, usable = loss.exact_table.table(a[:2], (3 * a, 2 * b))  # normalised
    assert usable is None
    torch.testing.assert_close(table_a, a, atol=1e-15, rtol=0)
    torch.testing.assert_close(table_b, b, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match=r"candidates must have shape \(5, 3\)"):
        loss.exact_table.table(a[:2], (a[:4], b[:4]))
    with pytest.raises(ValueError, match=r"refresh_bank\(\) before each step"):
        loss.exact_table.table(a[:2], None)
    loss.refresh_bank(a, b)
    table_a, table_b, usable = loss.exact_table.table(a[:2], None)
    assert torch.equal(table_a, loss.bank[0]) and torch.equal(table_b, loss.bank[1]) and usable is None


# ------------------------------------------------------------------ TableRates
@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_table_rates_with_the_current_features_are_the_exact_rate(mode):
    a, b = _unit(10, 4)
    loss = _loss(10, estimator="exact", mode=mode, chunk_size=4, temperature=0.5)
    index = torch.tensor([7, 2, 5, 0])
    scale = torch.tensor(2.0, dtype=torch.float64)
    batch = PairBatch.build(a[index], b[index], scale, index, mode)
    log_zbatch = batch.log_partition(1.0 / loss.candidate_count, 1.0 - 1.0 / loss.candidate_count)
    log_zhat, terms = loss.table_rates.estimate(batch, a[index], b[index], scale, log_zbatch, a, b, None)
    torch.testing.assert_close(log_zhat, log_z_exact(a, b, 0.5, mode)[:, index], atol=1e-12, rtol=0)
    assert len(terms) == 1 and terms[0] is log_zbatch  # anchor_gradient="batch": the batch term only


def test_table_rates_over_a_partly_written_bank_equal_a_loop():
    """Zhat_i = 1/N exp(s_ii) + (N-1)/N mean over the fresh batch negatives and the written rows of the other items."""
    n_items, scale = 8, 2.5
    a, b = _unit(n_items, 4, seed=3)
    bank_a, bank_b = _unit(n_items, 4, seed=4)
    seen = torch.tensor([True, True, False, True, False, True, True, False])
    index = torch.tensor([1, 4, 6])
    loss = _loss(n_items, estimator="memory", chunk_size=3)
    s = torch.tensor(scale, dtype=torch.float64)
    batch = PairBatch.build(a[index], b[index], s, index, "bimodal")
    log_zhat, _ = loss.table_rates.estimate(batch, a[index], b[index], s, batch.log_partition(0.125, 0.875),
                                            bank_a, bank_b, seen)
    for r, i in enumerate(index.tolist()):
        for direction, (anchor, partner, fresh, table) in enumerate(((a[i], b[i], b, bank_b), (b[i], a[i], a, bank_a))):
            negatives = [math.exp(scale * float(anchor @ fresh[j])) for j in index.tolist() if j != i]
            negatives += [math.exp(scale * float(anchor @ table[j])) for j in range(n_items)
                          if bool(seen[j]) and j not in index.tolist()]
            want = math.log(math.exp(scale * float(anchor @ partner)) / 8 + 7 / 8 * sum(negatives) / len(negatives))
            assert log_zhat[direction, r].item() == pytest.approx(want, abs=1e-12)


def test_table_rates_split_the_anchor_and_candidate_gradients():
    """anchor_gradient="table": the term log Zhat carries gradient to the anchors only, the batch-negative term to
    the candidates only, and the rows of the table get none."""
    a, b = _unit(6, 3)
    loss = _loss(6, estimator="exact", anchor_gradient="table")
    index = torch.tensor([0, 3, 4])
    fa, fb = a[index].clone().requires_grad_(True), b[index].clone().requires_grad_(True)
    s = torch.tensor(3.0, dtype=torch.float64)
    batch = PairBatch.build(fa, fb, s, index, "bimodal")
    log_zhat, terms = loss.table_rates.estimate(batch, fa, fb, s, batch.log_partition(1 / 6, 5 / 6), a, b, None)
    log_anchor, log_candidates = terms
    torch.testing.assert_close(log_anchor.detach(), log_zhat, atol=0, rtol=0)
    grad_a, grad_b = torch.autograd.grad(log_anchor[0].sum(), (fa, fb))
    assert grad_a.abs().sum() > 0
    # direction 0's anchors are the a rows: b_i gets the positive's share of the partition alone,
    # d/d b_i log Zhat_i = (exp(s_ii) / n) / Zhat_i * scale * a_i
    share = (3.0 * (fa * fb).sum(1) - math.log(6) - log_zhat[0]).exp()
    torch.testing.assert_close(grad_b, share[:, None] * 3.0 * fa.detach(), atol=1e-12, rtol=0)
    grad_a, grad_b = torch.autograd.grad(log_candidates[0].sum(), (fa, fb), allow_unused=True)
    assert grad_a is None or grad_a.abs().sum() == 0
    assert grad_b.abs().sum() > 0


# ------------------------------------------------------------------ the helpers
def test_scan_tables_equals_a_masked_logsumexp():
    anchors, table = _unit(4, 3, seed=5)[0], _unit(9, 3, seed=6)[0]
    usable = torch.tensor([True, False, True, True, True, False, True, True, True])
    columns = torch.tensor([8, 1, 2, 2, 5, 0, 3])
    anchor_index = torch.tensor([2, 0, 7, 3])
    s = torch.tensor(1.5, dtype=torch.float64)
    lse, count = scan_tables(anchors, (table, table.flip(0)), columns, usable, s, 2, anchor_index)
    for r in range(4):
        values = [1.5 * float(anchors[r] @ t[j]) for t in (table, table.flip(0)) for j in columns.tolist()
                  if bool(usable[j]) and j != int(anchor_index[r])]
        assert count[r].item() == len(values)
        assert lse[r].item() == pytest.approx(float(torch.logsumexp(torch.tensor(values, dtype=torch.float64), 0)), abs=1e-12)
    lse_all, count_all = scan_tables(anchors, (table,), None, None, s, 4)
    torch.testing.assert_close(lse_all, torch.logsumexp(1.5 * anchors @ table.T, 1), atol=1e-12, rtol=0)
    assert count_all.tolist() == [9] * 4


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_one_side_keeps_the_values_and_routes_the_gradient(mode, chunk_size):
    a, b = _unit(5, 3)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    index = torch.arange(5)
    batch = PairBatch.build(a, b, s, index, mode, chunk_size=chunk_size)
    full = batch.log_partition(0.0, 1.0)
    for anchor in (True, False):
        side = one_side(batch, a, b, s, anchor).log_partition(0.0, 1.0)
        torch.testing.assert_close(side, full, atol=1e-12, rtol=0)
        if mode == "bimodal":  # direction 0: anchors a, candidates b
            grad_a, grad_b, grad_s = torch.autograd.grad(side[0].sum(), (a, b, s), allow_unused=True)
            frozen, moving = (grad_b, grad_a) if anchor else (grad_a, grad_b)
            assert (frozen is None or frozen.abs().sum() == 0) and moving.abs().sum() > 0
            scaled = grad_s is not None and bool(grad_s.abs() > 0)
            assert scaled == anchor  # the scale goes with the anchor side


# ------------------------------------------------------------------ loading
def test_a_state_saved_before_the_parts_buffers_existed_loads():
    """A checkpoint of log_z, visits, last_step, step, rng_state and bank only (before scale_at, slope, in_bank
    and bank_step): the missing buffers keep their current values, the bank is allocated to the saved shape."""
    trained = GammaContrastiveLoss(6, estimator="memory")
    a, b = _unit(6, 3)
    trained.refresh_bank(a.float(), b.float())
    trained.log_z.fill_(1.25)
    old = {k: v for k, v in trained.state_dict().items() if k not in ("scale_at", "slope", "in_bank", "bank_step")}
    fresh = GammaContrastiveLoss(6, estimator="memory")
    fresh.load_state_dict(old)
    assert torch.equal(fresh.bank, trained.bank) and torch.equal(fresh.log_z, trained.log_z)
    assert not fresh.in_bank.any() and int(fresh.bank_step) == -1
    assert fresh.scale_at.abs().sum() == 0 and fresh.slope.abs().sum() == 0
    # an allocated bank takes a saved empty one (a checkpoint of a loss that never wrote it)
    fresh.load_state_dict(GammaContrastiveLoss(6, estimator="memory").state_dict())
    assert fresh.bank.numel() == 0
