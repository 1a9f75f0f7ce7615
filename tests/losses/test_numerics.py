"""Low temperature, half-precision inputs and huge feature norms: finite values and gradients
that match a float64 evaluation of the same (quantised) inputs within the dtype's tolerance."""

import pytest
import torch

from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss, generalized_contrastive_loss

N, B, D = 64, 16, 8
LOSSES = {
    "infonce": lambda t=0.01: InfoNCELoss(temperature=t),
    "infonce-unimodal": lambda t=0.01: InfoNCELoss(temperature=t, mode="unimodal"),
    "gamma-ema": lambda t=0.01: GammaContrastiveLoss(N, temperature=t, estimator="ema", shape=1.0),
    "gamma-exact": lambda t=0.01: GammaContrastiveLoss(N, temperature=t, estimator="exact"),
    "gamma-memory-unimodal": lambda t=0.01: GammaContrastiveLoss(N, temperature=t, estimator="memory", mode="unimodal"),
    "sogclr": lambda t=0.01: SogCLRLoss(N, temperature=t),
    "generalized": None,
}
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}
# The float32 computation on float32/bfloat16 inputs, the gradient returned in the input dtype.
SCALE_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _evaluate(name, a, b, all_a, all_b, index):
    """Two steps (the second one reads the state of the first), returning the second value and grads."""
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    if name == "generalized":
        value = generalized_contrastive_loss(a, b, temperature=0.01)
        return value, torch.autograd.grad(value, (a, b))
    loss = LOSSES[name]()
    options = {} if name.startswith("infonce") else {"index": index}
    if "exact" in name:
        options["candidates"] = (all_a, all_b)
    value = None
    for _ in range(2):
        value = loss(a, b, **options)
    return value, torch.autograd.grad(value, (a, b))


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", [1.0, 1e4])
def test_low_temperature_half_precision_large_norms(name, dtype, norm, capsys):
    generator = torch.Generator().manual_seed(0)
    all_a = torch.randn(N, D, generator=generator)
    all_b = all_a + 0.3 * torch.randn(N, D, generator=generator)
    all_a, all_b = (torch.nn.functional.normalize(x, dim=1) * norm for x in (all_a, all_b))
    index = torch.randperm(N, generator=generator)[:B]
    a, b = all_a[index].to(dtype), all_b[index].to(dtype)
    value, grads = _evaluate(name, a, b, all_a.to(dtype), all_b.to(dtype), index)
    ref_value, ref_grads = _evaluate(name, a.double(), b.double(), all_a.to(dtype).double(), all_b.to(dtype).double(), index)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    tol = TOLERANCE[dtype]
    assert value.item() == pytest.approx(ref_value.item(), rel=tol, abs=tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= tol * scale + 1e-12
    assert capsys.readouterr() == ("", "")


def _unit64(x):
    """The float64 reference normalisation, by hand: x / ||x|| per row."""
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


def _evaluate_prepared(name, a, b, all_a, all_b, index, prepare, temperature):
    """As _evaluate, on prepare(a), prepare(b); gradients with respect to the raw a, b."""
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    if name == "generalized":
        value = generalized_contrastive_loss(prepare(a), prepare(b), temperature=temperature)
        return value, torch.autograd.grad(value, (a, b))
    loss = LOSSES[name](temperature)
    options = {} if name.startswith("infonce") else {"index": index}
    if "exact" in name:
        options["candidates"] = (prepare(all_a), prepare(all_b))
    value = None
    for _ in range(2):
        value = loss(prepare(a), prepare(b), **options)
    return value, torch.autograd.grad(value, (a, b))


def _row_scales(norm, rows):
    if norm != "mixed":
        return torch.full((rows, 1), norm, dtype=torch.float64)
    return torch.tensor([1e-30, 1e-15, 1e-3, 1.0, 1e7, 1e30], dtype=torch.float64).repeat(rows)[:rows, None]


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm", [1e-15, 1.0, 1e30, "mixed"])
def test_row_scale_invariance_over_the_float_range(name, dtype, norm):
    """Rows of norm 1e-15 (below F.normalize's 1e-12 floor) and 1e30 (squared norm past float32's
    range): the value equals the float64 loss of the hand-normalised rows, and the gradients are
    nonzero and equal float64 autograd through x / ||x|| on the same inputs (they scale as 1/norm)."""
    generator = torch.Generator().manual_seed(1)
    all_a = torch.randn(N, D, generator=generator, dtype=torch.float64)
    all_b = all_a + 0.3 * torch.randn(N, D, generator=generator, dtype=torch.float64)
    unit_a, unit_b = (torch.nn.functional.normalize(x, dim=1) for x in (all_a, all_b))
    all_a, all_b = (unit_a * _row_scales(norm, N)).to(dtype), (unit_b * _row_scales(norm, N)).to(dtype)
    index = torch.randperm(N, generator=generator)[:B]
    a, b = all_a[index], all_b[index]
    if dtype == torch.float32:  # rounding the scaled rows to float32 moves them by 6e-8 only
        at_norm_1, _ = _evaluate_prepared(name, unit_a[index], unit_b[index], unit_a, unit_b, index, _unit64, 0.1)
        value, _ = _evaluate_prepared(name, a, b, all_a, all_b, index, lambda x: x, 0.1)
        assert value.item() == pytest.approx(at_norm_1.item(), rel=1e-5, abs=1e-6)
    value, grads = _evaluate_prepared(name, a, b, all_a, all_b, index, lambda x: x, 0.1)
    ref_value, ref_grads = _evaluate_prepared(
        name, a.double(), b.double(), all_a.double(), all_b.double(), index, _unit64, 0.1
    )
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5, abs=1e-6)
    rows = _row_scales(norm, N)[index]
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got != 0).any(dim=1).all()
        # times the row's norm: the gradient with respect to the row's direction, O(0.1) for all rows
        got, want = got.double() * rows, want * rows
        assert (got - want).abs().max().item() <= SCALE_TOLERANCE[dtype] * want.abs().max().item()


@pytest.mark.parametrize("name", ["infonce", "sogclr", "generalized"])
@pytest.mark.parametrize("side,row", [("features_a", 3), ("features_b", 0)])
def test_all_zero_row_is_refused_by_name(name, side, row):
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    (a if side == "features_a" else b)[row] = 0.0
    with pytest.raises(ValueError, match=f"{side} row {row} is all zeros"):
        if name == "generalized":
            generalized_contrastive_loss(a, b)
        elif name == "infonce":
            InfoNCELoss()(a, b)
        else:
            SogCLRLoss(10)(a, b, index=torch.arange(5))
    # Without normalisation a zero row is a valid (orthogonal) feature.
    assert torch.isfinite(InfoNCELoss(normalize=False)(a, b))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rows_are_passed_through(bad):
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    a[2, 1] = bad
    assert torch.isnan(InfoNCELoss()(a, b))
