"""Low temperature, half-precision inputs and huge feature norms: finite values and gradients
that match a float64 evaluation of the same (quantised) inputs within the dtype's tolerance."""

import pytest
import torch

from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss, generalized_contrastive_loss

N, B, D = 64, 16, 8
LOSSES = {
    "infonce": lambda: InfoNCELoss(temperature=0.01),
    "infonce-unimodal": lambda: InfoNCELoss(temperature=0.01, mode="unimodal"),
    "gamma-ema": lambda: GammaContrastiveLoss(N, temperature=0.01, estimator="ema", shape=1.0),
    "gamma-exact": lambda: GammaContrastiveLoss(N, temperature=0.01, estimator="exact"),
    "gamma-memory-unimodal": lambda: GammaContrastiveLoss(N, temperature=0.01, estimator="memory", mode="unimodal"),
    "sogclr": lambda: SogCLRLoss(N, temperature=0.01),
    "generalized": None,
}
TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 1e-4}


def _evaluate(name, a, b, all_a, all_b, index):
    """Two steps (the second one reads the state of the first), returning the second value and grads."""
    a = a.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    if name == "generalized":
        value = generalized_contrastive_loss(a, b, 0.01)
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
