"""grad_cache_step equals the plain step: same loss, parameter gradients, optimizer update and loss state."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch

from plait.grad_cache import RngState, chunk_bounds, concat_features, grad_cache_step, slice_batch
from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss
from plait.losses.objective import ContrastiveObjective, build_regularizer
from plait.models import BagOfWordsEncoder, MLPEncoder, TwoTower
from plait.models.contract import Batch, apply_objective

N, B = 24, 10  # dataset size, batch size
WORDS = "a red dog runs on the green grass while two cats sleep near an old wooden house".split()


def make_model(text: bool = False, dropout: float = 0.0, seed: int = 0) -> TwoTower:
    torch.manual_seed(seed)
    tower_a = MLPEncoder(in_dim=6, out_dim=8, hidden=(12, 12), dropout=dropout)
    tower_b = BagOfWordsEncoder(out_dim=8, embed_dim=8, max_length=12) if text else MLPEncoder(5, 8, (12,), dropout)
    return TwoTower(tower_a, tower_b, embed_dim=4, init_temperature=0.2, projection_hidden=6).double()


def make_batch(seed: int, text: bool = False, augmented: bool = False, size: int = B) -> Batch:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    def texts() -> list[str]:
        return [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) for _ in range(size)]

    def view_b():
        return texts() if text else torch.randn(size, 5, generator=g, dtype=torch.float64)

    a = torch.randn(size, 6, generator=g, dtype=torch.float64)
    index = torch.randperm(N, generator=g)[:size]
    if not augmented:
        return Batch(index, a, view_b())
    return Batch(index, a, view_b(), a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64), view_b())


OBJECTIVES = {
    "infonce": lambda: ContrastiveObjective(InfoNCELoss()),
    "gamma_ema": lambda: ContrastiveObjective(GammaContrastiveLoss(N, estimator="ema")),
    "gamma_ema_sampled": lambda: ContrastiveObjective(GammaContrastiveLoss(N, estimator="ema", shape=2.0)),
    "gamma_memory": lambda: ContrastiveObjective(GammaContrastiveLoss(N, estimator="memory")),
    "sogclr": lambda: ContrastiveObjective(SogCLRLoss(N)),
}
AUGMENTED = {
    "infonce_consistency": lambda: ContrastiveObjective(InfoNCELoss(), regularizers=[build_regularizer({"name": "consistency"})]),
    "sogclr_in_modal_gamma_consistency": lambda: ContrastiveObjective(
        SogCLRLoss(N), in_modal=(GammaContrastiveLoss(N, estimator="ema"), GammaContrastiveLoss(N, estimator="ema")),
        regularizers=[build_regularizer({"name": "consistency", "weight": 0.5})]),
}


def plain_step(model: TwoTower, objective, batch: Batch) -> torch.Tensor:
    loss = apply_objective(objective, model.contrastive_features(batch))
    loss.backward()
    return loss.detach()


def assert_same_gradients(model: TwoTower, ref: TwoTower, atol: float = 1e-10) -> None:
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_state(objective, ref) -> None:
    state, expected = objective.state_dict(), ref.state_dict()
    assert state.keys() == expected.keys()
    for key in state:  # float64 features: a chunked matrix product may round its last bit differently
        atol = 1e-12 if state[key].dtype == torch.float64 else 0
        torch.testing.assert_close(state[key], expected[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def compare(build_objective, chunk: int, text: bool = False, augmented: bool = False, steps: int = 2) -> None:
    """``steps`` AdamW steps, grad cache against the plain step, from identical copies."""
    model, objective = make_model(text), build_objective()
    ref, ref_objective = copy.deepcopy(model), copy.deepcopy(objective)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(steps):
        batch = make_batch(step, text, augmented)
        optimizer.zero_grad(set_to_none=True)
        ref_optimizer.zero_grad(set_to_none=True)
        expected = plain_step(ref, ref_objective, batch)
        out = grad_cache_step(model.contrastive_features, batch, objective, chunk)
        assert out.loss.grad_fn is None and not out.loss.requires_grad
        torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-10)
        assert out.terms.keys() == ref_objective.stats.keys()
        assert_same_gradients(model, ref)
        assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
        assert_same_state(objective, ref_objective)
        optimizer.step()
        ref_optimizer.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # the bar
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)  # what it reaches


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("chunk", [3, 5])  # 10 rows: 3 does not divide B, 5 does
def test_equals_plain_step(name, chunk):
    compare(OBJECTIVES[name], chunk)


@pytest.mark.parametrize("name", sorted(AUGMENTED))
@pytest.mark.parametrize("chunk", [1, 4])
def test_equals_plain_step_with_augmented_views(name, chunk):
    compare(AUGMENTED[name], chunk, augmented=True)


@pytest.mark.parametrize("name", ["infonce", "gamma_memory"])
def test_text_tower(name):
    compare(OBJECTIVES[name], 4, text=True)


def test_text_tower_augmented():
    compare(AUGMENTED["infonce_consistency"], 3, text=True, augmented=True, steps=1)


@pytest.mark.parametrize("chunk", [B, B + 7])
def test_chunk_at_least_batch_is_plain_step(chunk):
    compare(OBJECTIVES["gamma_ema"], chunk)


def chunked_plain_step(model: TwoTower, objective, batch: Batch, chunk: int) -> torch.Tensor:
    """The plain step with the encoder run chunk by chunk (the dropout masks grad cache draws)."""
    parts = [model.contrastive_features(slice_batch(batch, start, stop)) for start, stop in chunk_bounds(len(batch.index), chunk)]
    loss = apply_objective(objective, concat_features(parts))
    loss.backward()
    return loss.detach()


def dropout_run(chunk: int, restore: bool = True, monkeypatch=None):
    model, objective = make_model(dropout=0.3), OBJECTIVES["sogclr"]()
    ref, ref_objective = copy.deepcopy(model), copy.deepcopy(objective)
    batch = make_batch(0)
    torch.manual_seed(123)
    chunked_plain_step(ref, ref_objective, batch, chunk)
    after_ref = torch.get_rng_state()
    torch.manual_seed(123)
    if not restore:
        monkeypatch.setattr(RngState, "restore", lambda self: None)
    grad_cache_step(model.contrastive_features, batch, objective, chunk)
    return model, ref, objective, ref_objective, after_ref


@pytest.mark.parametrize("chunk", [3, 5])
def test_dropout_same_masks(chunk):
    model, ref, objective, ref_objective, after_ref = dropout_run(chunk)
    assert_same_gradients(model, ref)
    assert_same_state(objective, ref_objective)
    assert torch.equal(torch.get_rng_state(), after_ref)  # the generator ends where the plain step leaves it


class DrawingObjective(torch.nn.Module):
    """InfoNCE plus a draw from the global generator in its forward pass."""

    def __init__(self):
        super().__init__()
        self.inner = OBJECTIVES["infonce"]()

    def forward(self, features):
        torch.rand(3)
        return self.inner(features)


def test_rng_ends_after_the_objective_draws():
    model, objective = make_model(dropout=0.2), DrawingObjective()
    ref, ref_objective = copy.deepcopy(model), copy.deepcopy(objective)
    batch = make_batch(0)
    torch.manual_seed(7)
    chunked_plain_step(ref, ref_objective, batch, 4)
    expected = torch.get_rng_state()
    torch.manual_seed(7)
    grad_cache_step(model.contrastive_features, batch, objective, 4)
    assert torch.equal(torch.get_rng_state(), expected)
    assert_same_gradients(model, ref)


def test_dropout_without_restore_differs(monkeypatch):
    """The control: without the RNG restore, stage 2 draws other masks and the gradient is wrong."""
    model, ref, *_ = dropout_run(3, restore=False, monkeypatch=monkeypatch)
    with pytest.raises(AssertionError):
        assert_same_gradients(model, ref, atol=1e-6)


def test_no_sync_all_but_last_and_scale_in_last():
    """DDP's contract: every backward but the last inside no_sync; the last reaches every parameter."""
    model, objective = make_model(), OBJECTIVES["infonce"]()
    inside = {"now": False, "entered": 0}
    reached_in_last: set[str] = set()

    @contextlib.contextmanager
    def no_sync():
        inside["now"] = True
        inside["entered"] += 1
        try:
            yield
        finally:
            inside["now"] = False

    for name, p in model.named_parameters():
        p.register_hook(lambda grad, n=name: reached_in_last.add(n) if not inside["now"] else None)
    grad_cache_step(model.contrastive_features, make_batch(0), objective, 3, no_sync=no_sync)
    assert inside["entered"] == len(chunk_bounds(B, 3)) - 1 == 3
    assert reached_in_last == {name for name, _ in model.named_parameters()}


def test_scale_loss_scales_gradients():
    model, objective = make_model(), OBJECTIVES["infonce"]()
    ref, ref_objective = copy.deepcopy(model), copy.deepcopy(objective)
    batch = make_batch(0)
    plain_step(ref, ref_objective, batch)
    out = grad_cache_step(model.contrastive_features, batch, objective, 4, scale_loss=lambda loss: 8.0 * loss)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, 8.0 * q.grad, rtol=0, atol=1e-10)
    assert out.loss.item() == pytest.approx(apply_objective(ref_objective, ref.contrastive_features(batch)).item())


def test_returned_features_are_the_plain_features():
    model, objective = make_model(), OBJECTIVES["infonce"]()
    batch = make_batch(1, augmented=True)
    out = grad_cache_step(model.contrastive_features, batch, objective, 3)
    with torch.no_grad():
        expected = model.contrastive_features(batch)
    for name in ("a", "b", "a_aug", "b_aug", "logit_scale", "index"):
        value = getattr(out.features, name)
        assert not value.requires_grad
        torch.testing.assert_close(value, getattr(expected, name), rtol=0, atol=1e-6)
    assert out.features.a_ind is None and out.features.a_bank is None


def test_slice_batch():
    batch = make_batch(0, text=True, augmented=True)
    batch.bank = (torch.randn(B, 4), torch.randn(B, 4))
    batch.extra = {"labels": torch.arange(B), "names": [str(i) for i in range(B)], "note": "kept", "scalar": torch.tensor(1.0)}
    part = slice_batch(batch, 2, 5)
    assert torch.equal(part.index, batch.index[2:5]) and torch.equal(part.a, batch.a[2:5])
    assert part.b == batch.b[2:5] and part.b_aug == batch.b_aug[2:5] and torch.equal(part.a_aug, batch.a_aug[2:5])
    assert torch.equal(part.bank[0], batch.bank[0][2:5]) and torch.equal(part.bank[1], batch.bank[1][2:5])
    assert torch.equal(part.extra["labels"], torch.arange(2, 5)) and part.extra["names"] == ["2", "3", "4"]
    assert part.extra["note"] == "kept" and part.extra["scalar"] is batch.extra["scalar"]
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True])
def test_bad_chunk(chunk):
    model, objective = make_model(), OBJECTIVES["infonce"]()
    with pytest.raises(ValueError, match="chunk"):
        grad_cache_step(model.contrastive_features, make_batch(0), objective, chunk)
