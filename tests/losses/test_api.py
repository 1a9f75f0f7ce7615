"""The calling convention ``loss(features_a, features_b, logit_scale, *, index)``, the index check of
InfoNCE, single-pair batches and mixed-dtype promotion, against hand computations in float64."""

import inspect
import math

import pytest
import torch
from pytorch_metric_learning.losses import NTXentLoss

from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss, generalized_contrastive_loss
from tests.losses.reference import generalized_loop

P = inspect.Parameter


def _pairs(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), (x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)


def _clip_by_hand(a, b, logit_scale):
    """open_clip's ClipLoss on python floats: logits = logit_scale * a_n @ b_n.T, the mean of the
    image->text and text->image cross-entropies with labels arange(B)."""
    rows = [[float(x) for x in r] for r in a]
    cols = [[float(x) for x in r] for r in b]
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    rows, cols = [unit(v) for v in rows], [unit(v) for v in cols]
    n = len(rows)
    logits = [[logit_scale * sum(x * y for x, y in zip(rows[i], cols[j])) for j in range(n)] for i in range(n)]

    def cross_entropy(matrix):
        return sum(-matrix[i][i] + math.log(sum(math.exp(v) for v in matrix[i])) for i in range(n)) / n

    transposed = [[logits[j][i] for j in range(n)] for i in range(n)]
    return (cross_entropy(logits) + cross_entropy(transposed)) / 2


@pytest.mark.parametrize(
    "cls,index_default", [(InfoNCELoss, None), (SogCLRLoss, P.empty), (GammaContrastiveLoss, P.empty)]
)
def test_forward_signature_puts_logit_scale_third_and_index_keyword_only(cls, index_default):
    params = list(inspect.signature(cls.forward).parameters.values())
    assert [p.name for p in params[:5]] == ["self", "features_a", "features_b", "logit_scale", "index"]
    assert [p.kind for p in params[1:4]] == [P.POSITIONAL_OR_KEYWORD] * 3
    assert params[3].default is None
    assert all(p.kind == P.KEYWORD_ONLY for p in params[4:])
    assert params[4].default is index_default


def test_generalized_loss_takes_logit_scale_third_and_the_rest_keyword_only():
    params = list(inspect.signature(generalized_contrastive_loss).parameters.values())
    assert [p.name for p in params[:3]] == ["features_a", "features_b", "logit_scale"]
    assert params[2].default is None and all(p.kind == P.KEYWORD_ONLY for p in params[3:])
    a, b = _pairs(7, 5, seed=2)
    # the full-data loss is full-batch CLIP minus log N (both directions), here at scale 30 by hand
    assert generalized_contrastive_loss(a, b, 30.0).item() == pytest.approx(_clip_by_hand(a, b, 30.0) - math.log(7), abs=1e-12)


@pytest.mark.parametrize("scale", [30.0, 30, torch.tensor(30.0, dtype=torch.float64)])
def test_positional_logit_scale_matches_open_clip_by_hand(scale):
    a, b = _pairs(7, 5, seed=1)
    value = InfoNCELoss()(a, b, scale)
    expected = _clip_by_hand(a, b, 30.0)
    assert value.item() == pytest.approx(expected, abs=1e-12)
    # The default temperature 0.07 (scale 14.3) is a different value: the third argument is used.
    assert abs(InfoNCELoss()(a, b).item() - expected) > 1e-2


def test_sogclr_positional_logit_scale_on_a_first_full_batch():
    a, b = _pairs(6, 4, seed=2)
    value = SogCLRLoss(6)(a, b, 30.0, index=torch.arange(6))
    assert value.item() == pytest.approx(generalized_loop(a, b, 1 / 30).item(), abs=1e-9)


def test_an_index_passed_positionally_is_refused():
    a, b = _pairs(4, 3)
    index = torch.arange(4)
    with pytest.raises(ValueError, match="logit_scale must be a floating-point scalar.*index=... by keyword"):
        InfoNCELoss()(a, b, index)
    with pytest.raises(ValueError, match="logit_scale must be a floating-point scalar"):
        InfoNCELoss()(a[:1], b[:1], index[:1])  # one element: would otherwise pass as scale 0
    with pytest.raises(ValueError, match="logit_scale must be a floating-point scalar"):
        SogCLRLoss(10)(a, b, index, index=index)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'index'"):
        SogCLRLoss(10)(a, b, index)
    with pytest.raises(TypeError):
        SogCLRLoss(10)(a, b, None, index)
    with pytest.raises(TypeError):
        InfoNCELoss()(a, b, None, index)


@pytest.mark.parametrize(
    "index,match",
    [
        ([0, 1, 2, 3], "must be an integer torch.Tensor"),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer tensor"),
        (torch.tensor([True, False, True, False]), "integer tensor"),
        (torch.arange(5), "shape \\(4,\\) to match the features"),
        (torch.arange(4).reshape(2, 2), "shape \\(4,\\)"),
        (torch.tensor([0, -1, 2, 3]), "index -1 is out of range"),
    ],
)
def test_infonce_checks_a_given_index(index, match):
    a, b = _pairs(4, 3)
    with pytest.raises(ValueError, match=match):
        InfoNCELoss()(a, b, index=index)


def test_infonce_ignores_a_valid_index():
    a, b = _pairs(5, 3)
    plain = InfoNCELoss()(a, b)
    for index in (torch.tensor([10**9, 3, 3, 0, 7]), torch.arange(5, dtype=torch.int32)):
        assert torch.equal(InfoNCELoss()(a, b, index=index), plain)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_infonce_single_pair_is_zero_with_zero_gradient(mode):
    """-log softmax over one candidate: -log(exp(s) / exp(s)) = 0 for any s."""
    a, b = _pairs(1, 4, seed=3)
    a.requires_grad_(True)
    b.requires_grad_(True)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    value = InfoNCELoss(mode=mode)(a, b, scale, index=torch.tensor([5]))
    assert value.item() == 0.0
    for grad in torch.autograd.grad(value, (a, b, scale)):
        assert torch.equal(grad, torch.zeros_like(grad))
    if mode == "unimodal":
        oracle = NTXentLoss(temperature=0.05)(torch.cat([a, b]), torch.tensor([0, 0]))
        assert oracle.item() == 0.0


def test_losses_that_estimate_negatives_refuse_a_single_pair():
    a, b = _pairs(1, 3)
    message = "needs at least 2 pairs to estimate each anchor's sum over its negatives"
    with pytest.raises(ValueError, match=message):
        SogCLRLoss(10)(a, b, index=torch.tensor([0]))
    with pytest.raises(ValueError, match=message):
        GammaContrastiveLoss(10)(a, b, index=torch.tensor([0]))
    with pytest.raises(ValueError, match=message):
        generalized_contrastive_loss(a, b)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("swap", [False, True])
def test_mixed_dtypes_compute_in_the_promoted_dtype(mode, swap):
    a32, b64 = _pairs(6, 4, seed=4)
    a32 = a32.float()
    pair = (b64, a32) if swap else (a32, b64)
    exact = tuple(x.double() for x in pair)  # float32 values are exact in float64
    value = InfoNCELoss(mode=mode)(*pair)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(InfoNCELoss(mode=mode)(*exact).item(), abs=1e-13)
    index = torch.arange(6)
    value = SogCLRLoss(6, mode=mode)(*pair, index=index)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(SogCLRLoss(6, mode=mode)(*exact, index=index).item(), abs=1e-13)
    for estimator in ("ema", "memory"):  # fresh state: the first visit's estimate
        value = GammaContrastiveLoss(6, estimator=estimator, mode=mode)(*pair, index=index)
        assert value.dtype == torch.float64
        reference = GammaContrastiveLoss(6, estimator=estimator, mode=mode)(*exact, index=index)
        assert value.item() == pytest.approx(reference.item(), abs=1e-13)
    value = generalized_contrastive_loss(*pair, mode=mode)
    assert value.item() == pytest.approx(generalized_loop(*exact, 0.1, mode).item(), abs=1e-12)


def test_half_dtypes_promote_to_float32():
    a, b = _pairs(5, 3, seed=5)
    value = InfoNCELoss()(a.half(), b.bfloat16())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(InfoNCELoss()(a.half().double(), b.bfloat16().double()).item(), abs=1e-5)
