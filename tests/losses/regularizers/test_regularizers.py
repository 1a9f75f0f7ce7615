"""Each regulariser against a brute-force double loop (float64), its known zeros, and its
gradients at low temperature and in bfloat16."""

import math

import pytest
import torch

from plait.losses import InfoNCELoss
from plait.losses.objective import ContrastiveObjective, PairFeatures, build_regularizer
from plait.losses.regularizers import BrownianBridge, FeatureSeparation, GeometricConsistency


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


def dot(x, y):
    return float(sum(float(p) * float(q) for p, q in zip(x, y)))


# ------------------------------------------------------------------ brute-force references
def bridge_loop(zv, zt, zva, t):
    total = 0.0
    for j in range(len(zv)):
        mix = [t * float(p) + (1 - t) * float(q) for p, q in zip(zv[j], zt[j])]
        norm = math.sqrt(sum(m * m for m in mix))
        total += sum((float(a) - m / norm) ** 2 for a, m in zip(zva[j], mix))
    return total / len(zv)


def consistency_loop(zv, zt, zva, zta):
    n = len(zv)
    gc = gca = 0.0
    for j in range(n):
        for k in range(n):
            gc += (dot(zv[j], zt[k]) - dot(zv[k], zt[j])) ** 2 + (dot(zv[j], zv[k]) - dot(zt[j], zt[k])) ** 2
            gca += (dot(zv[j], zv[k]) - dot(zva[j], zva[k])) ** 2 + (dot(zt[j], zt[k]) - dot(zta[j], zta[k])) ** 2
    diag = sum((dot(zv[j], zt[j]) - dot(zva[j], zta[j])) ** 2 for j in range(n))
    return gc / n + gca / n + diag / n


def infonce_loop(x, y, temperature):
    n = len(x)
    total = 0.0
    for i in range(n):
        row = [dot(x[i], y[j]) / temperature for j in range(n)]
        col = [dot(y[i], x[j]) / temperature for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(r) for r in row)) - col[i] + math.log(sum(math.exp(c) for c in col))
    return total / (2 * n)


def separation_loop(zv, zt, ziv, zit, ziva, zita, temperature, t):
    n = len(zv)
    ortho = sum(dot(zv[j], ziv[j]) ** 2 + dot(zt[j], zit[j]) ** 2 for j in range(n)) / n
    con = (infonce_loop(ziv, ziva, temperature) + infonce_loop(zit, zita, temperature)) / 2
    uni = 0.0
    for j in range(n):
        for k in range(n):
            dv = sum((float(p) - float(q)) ** 2 for p, q in zip(ziv[j], ziv[k]))
            dt = sum((float(p) - float(q)) ** 2 for p, q in zip(zit[j], zit[k]))
            uni += math.exp(-t * dv) + math.exp(-t * dt)
    return ortho + con + math.log(uni / n)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_bridge_matches_loop(t):
    zv, zt, zva = _unit(6, 4, 0), _unit(6, 4, 1), _unit(6, 4, 2)
    assert BrownianBridge(t=t)(zv, zt, zva).item() == pytest.approx(bridge_loop(zv, zt, zva, t), abs=1e-12)


def test_consistency_matches_loop():
    zv, zt, zva, zta = (_unit(5, 3, s) for s in range(4))
    assert GeometricConsistency()(zv, zt, zva, zta).item() == pytest.approx(consistency_loop(zv, zt, zva, zta), abs=1e-12)


@pytest.mark.parametrize("temperature,t", [(0.1, 2.0), (0.5, 1.0)])
def test_separation_matches_loop(temperature, t):
    tensors = [_unit(5, 4, s) for s in range(6)]
    got = FeatureSeparation(temperature=temperature, t=t)(*tensors).item()
    assert got == pytest.approx(separation_loop(*tensors, temperature, t), abs=1e-10)


# ------------------------------------------------------------------ known zeros
def test_orthogonal_features_give_zero_ortho_term():
    basis = torch.eye(4, dtype=torch.float64)
    zv, zt = basis[[0, 1]], basis[[0, 1]]
    ziv, zit = basis[[2, 3]], basis[[3, 2]]
    module = FeatureSeparation()
    module(zv, zt, ziv, zit, ziv, zit)
    assert module.parts["ortho"].item() == 0.0


def test_augmented_feature_on_the_bridge_mean_gives_zero():
    zv, zt = _unit(7, 5, 0), _unit(7, 5, 1)
    bridge = BrownianBridge(t=0.25)
    assert bridge(zv, zt, bridge.bridge_mean(zv, zt)).item() == pytest.approx(0.0, abs=1e-14)


def test_identical_gram_matrices_and_augmented_features_give_zero_consistency():
    zv = _unit(6, 4, 0)
    zt = zv.clone()  # identical features: a symmetric cross-modal matrix and equal Gram matrices
    module = GeometricConsistency()
    assert module(zv, zt, zv.clone(), zt.clone()).item() == pytest.approx(0.0, abs=1e-14)
    assert module.parts["gc"].item() == pytest.approx(0.0, abs=1e-14)
    assert module.parts["gc_augmented"].item() == pytest.approx(0.0, abs=1e-14)


def test_uniform_t_draws_per_item_and_is_seeded():
    zv, zt, zva = _unit(8, 3, 0), _unit(8, 3, 1), _unit(8, 3, 2)
    a, b = BrownianBridge(t="uniform", seed=3), BrownianBridge(t="uniform", seed=3)
    assert a(zv, zt, zva).item() == b(zv, zt, zva).item()
    t = torch.rand(8, 1, generator=torch.Generator().manual_seed(4)).double()
    expected = ((zva - torch.nn.functional.normalize(t * zv + (1 - t) * zt, dim=1)) ** 2).sum(1).mean()
    assert BrownianBridge(t="uniform", seed=4)(zv, zt, zva).item() == pytest.approx(expected.item(), abs=1e-6)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", [{"name": "bridge"}, {"name": "gc"}, {"name": "sep", "temperature": 0.01}])
def test_gradients_finite_at_low_temperature_and_bfloat16(dtype, spec):
    leaves = [_unit(16, 8, s, dtype=torch.float32).to(dtype).requires_grad_(True) for s in range(6)]
    name, weight, module = build_regularizer(spec)
    objective = ContrastiveObjective(InfoNCELoss(temperature=0.01), regularizers=[(name, weight, module)])
    features = PairFeatures(leaves[0], leaves[1], None, None, leaves[2], leaves[3], leaves[4], leaves[5],
                            leaves[2], leaves[3])
    value = objective(features)
    value.backward()
    assert torch.isfinite(value)
    assert all(leaf.grad is None or torch.isfinite(leaf.grad.float()).all() for leaf in leaves)
    assert any(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)


def test_build_regularizer_errors():
    with pytest.raises(ValueError, match="unknown regularizer 'ortho'"):
        build_regularizer({"name": "ortho"})
    with pytest.raises(ValueError, match="has no option 'tt'"):
        build_regularizer({"name": "bridge", "tt": 0.3})
    with pytest.raises(ValueError, match="weight"):
        build_regularizer({"name": "bridge", "weight": -1})
    with pytest.raises(ValueError, match="t must be in"):
        build_regularizer({"name": "bridge", "t": 2})
    objective = ContrastiveObjective(InfoNCELoss(), regularizers=[build_regularizer({"name": "gc"})])
    with pytest.raises(ValueError, match="consistency needs the features a_aug, b_aug"):
        objective(PairFeatures(_unit(4, 3, 0), _unit(4, 3, 1)))


def test_in_modal_objective_is_a_quarter_of_each_direction():
    zv, zt, zva, zta = (_unit(6, 4, s) for s in range(4))
    base = InfoNCELoss(temperature=0.2)
    objective = ContrastiveObjective(InfoNCELoss(temperature=0.2),
                                     in_modal=(InfoNCELoss(temperature=0.2), InfoNCELoss(temperature=0.2)))
    value = objective(PairFeatures(zv, zt, None, None, zva, zta))
    # 1/4 (V2T + T2V + V2V + T2T), each pair loss already the mean of its two directions
    expected = infonce_loop(zv, zt, 0.2) / 2 + (infonce_loop(zv, zva, 0.2) + infonce_loop(zt, zta, 0.2)) / 4
    assert value.item() == pytest.approx(expected, abs=1e-10)
    assert base(zv, zt).item() == pytest.approx(infonce_loop(zv, zt, 0.2), abs=1e-10)


def test_reflected_modality_has_the_same_geometry_and_zero_consistency():
    """z_T = z_V H with H a Householder reflection (symmetric, orthogonal): equal Gram matrices
    and a symmetric cross-modal matrix z_V H z_V^T, so L_GC = 0 although z_T != z_V."""
    zv = _unit(6, 4, 0)
    u = torch.nn.functional.normalize(torch.randn(4, 1, dtype=torch.float64), dim=0)
    zt = zv @ (torch.eye(4, dtype=torch.float64) - 2 * u @ u.T)
    assert (zt - zv).abs().max() > 0.1
    module = GeometricConsistency()
    module(zv, zt, zv, zt)
    assert module.parts["gc"].item() == pytest.approx(0.0, abs=1e-12)
