import pytest
import torch
from pytorch_metric_learning.losses import NTXentLoss

from plait.losses import InfoNCELoss
from tests.losses.reference import infonce_loop


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("batch,dim", [(2, 3), (7, 5), (16, 32)])
def test_matches_brute_force_loop(mode, temperature, batch, dim):
    a, b = torch.randn(batch, dim, dtype=torch.float64), torch.randn(batch, dim, dtype=torch.float64)
    loss = InfoNCELoss(temperature=temperature, mode=mode)(a, b)
    assert loss.item() == pytest.approx(infonce_loop(a, b, temperature, mode).item(), abs=1e-9)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_unimodal_matches_pytorch_metric_learning_ntxent(temperature):
    a, b = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    labels = torch.arange(12)
    oracle = NTXentLoss(temperature=temperature)(torch.cat([a, b]), torch.cat([labels, labels]))
    ours = InfoNCELoss(temperature=temperature, mode="unimodal")(a, b)
    assert ours.item() == pytest.approx(oracle.item(), abs=1e-6)


def test_bimodal_matches_pytorch_metric_learning_with_reference_embeddings():
    a, b = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    labels = torch.arange(10)
    oracle = NTXentLoss(temperature=0.1)
    # ref_labels must be another tensor: PML drops the diagonal when it is the same object.
    a_to_b = oracle(a, labels, ref_emb=b, ref_labels=labels.clone())
    expected = (a_to_b + oracle(b, labels, ref_emb=a, ref_labels=labels.clone())) / 2
    assert InfoNCELoss(temperature=0.1)(a, b).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_gradcheck_features_and_logit_scale(mode):
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    loss = InfoNCELoss(mode=mode)
    assert torch.autograd.gradcheck(lambda x, y, s: loss(x, y, s), (a, b, scale))


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_gradcheck_through_the_row_scaling(mode):
    """Rows of norms 1e-3..1e3, one with a tied max-abs entry: x / max|x| is differentiable and
    its max path carries no net gradient, so the loss is smooth in x."""
    g = torch.Generator().manual_seed(4)
    rows = torch.tensor([1e-3, 1.0, 1e3, 5.0], dtype=torch.float64)[:, None]
    a = (torch.randn(4, 3, generator=g, dtype=torch.float64) * rows).requires_grad_(True)
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    b[1] = torch.tensor([2.0, -2.0, 0.5], dtype=torch.float64)
    b = (b * rows.flip(0)).requires_grad_(True)
    loss = InfoNCELoss(temperature=0.3, mode=mode)
    assert torch.autograd.gradcheck(lambda x, y: loss(x, y), (a, b), eps=1e-9, atol=1e-6)


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
def test_gradcheck_single_pair(mode):
    a = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, s: InfoNCELoss(mode=mode)(x, y, s, index=torch.tensor([0])), (a, b, scale))


def test_logit_scale_overrides_temperature():
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert InfoNCELoss(temperature=0.5)(a, b, 10.0).item() == pytest.approx(
        InfoNCELoss(temperature=0.1)(a, b).item(), abs=1e-12
    )


def test_normalize_false_uses_raw_dot_products():
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    raw = InfoNCELoss(temperature=1.0, normalize=False)(a, b)
    logits = a @ b.T
    labels = torch.arange(6)
    expected = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert raw.item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize(
    "a_shape,b_shape,match",
    [((4, 3), (4, 5), "features_a has shape"), ((4, 3), (5, 3), "features_a has shape"), ((4,), (4,), "shape \\(batch, dim\\)"),
     ((0, 3), (0, 3), "at least 1 pairs")],
)
def test_bad_shapes_raise(a_shape, b_shape, match):
    with pytest.raises(ValueError, match=match):
        InfoNCELoss()(torch.randn(a_shape), torch.randn(b_shape))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="mode"):
        InfoNCELoss(mode="trimodal")
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        InfoNCELoss()(torch.randn(3, 2), torch.randn(3, 2), torch.ones(2))
