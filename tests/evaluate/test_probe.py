import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from plait.evaluate import few_shot_indices, few_shot_probe, knn_accuracy, linear_probe


def _clusters(n_per_class, n_classes, dim, spread, seed, offset=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class) + offset
    centres = 4.0 * torch.eye(n_classes, dim)
    return centres[labels - offset] + spread * torch.randn(len(labels), dim, generator=g), labels


def test_linearly_separable_data_is_probed_perfectly():
    train_x, train_y = _clusters(30, 3, 10, 0.3, seed=0, offset=7)
    test_x, test_y = _clusters(20, 3, 10, 0.3, seed=1, offset=7)
    m = linear_probe(train_x, train_y, test_x, test_y)
    assert 0 < m.pop("log_loss") < math.log(3)
    assert m == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    m = linear_probe(train_x.half(), train_y, test_x.double(), test_y, shots=10, C=1.0)
    assert m["acc1"] == 1.0


def test_binary_and_acc5():
    train_x, train_y = _clusters(20, 2, 5, 0.3, seed=2)
    test_x, test_y = _clusters(10, 2, 5, 0.3, seed=3)
    assert linear_probe(train_x, train_y, test_x, test_y)["acc1"] == 1.0
    train_x, train_y = _clusters(20, 6, 8, 0.3, seed=4)
    test_x, test_y = _clusters(10, 6, 8, 0.3, seed=5)
    m = linear_probe(train_x, train_y, test_x, test_y)
    assert 0 < m.pop("log_loss") < math.log(6)
    assert m == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}


def test_matches_a_direct_scikit_learn_fit():
    g = torch.Generator().manual_seed(6)
    train_x, train_y = torch.randn(120, 6, generator=g), torch.randint(0, 4, (120,), generator=g)
    test_x, test_y = torch.randn(80, 6, generator=g), torch.randint(0, 4, (80,), generator=g)
    scaler = StandardScaler().fit(train_x.numpy())
    model = LogisticRegression(C=0.5, max_iter=1000).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    pred = model.predict(scaler.transform(test_x.numpy()))
    m = linear_probe(train_x, train_y, test_x, test_y, C=0.5)
    assert m["acc1"] == pytest.approx((pred == test_y.numpy()).mean(), abs=1e-12)
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(test_y.numpy(), pred), abs=1e-12)


def test_few_shot_indices_pick_exactly_k_per_class():
    labels = torch.tensor([3] * 7 + [0] * 4 + [9] * 10 + [5] * 3)[torch.randperm(24)]
    idx = few_shot_indices(labels, 3, seed=0)
    assert idx.dtype == torch.long and len(idx) == 12 and len(set(idx.tolist())) == 12
    assert idx.tolist() == sorted(idx.tolist())
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts[[0, 3, 5, 9]].tolist() == [3, 3, 3, 3] and counts.sum() == 12
    assert torch.equal(idx, few_shot_indices(labels, 3, seed=0))
    assert any(not torch.equal(idx, few_shot_indices(labels, 3, seed=s)) for s in range(1, 5))
    with pytest.raises(ValueError, match="class 5 has 3 training items, fewer than shots=4"):
        few_shot_indices(labels, 4)
    with pytest.raises(ValueError, match="shots"):
        few_shot_indices(labels, 0)


def test_shots_fit_on_the_sampled_items_only():
    g = torch.Generator().manual_seed(7)
    train_x, train_y = torch.randn(90, 5, generator=g), torch.arange(3).repeat(30)
    test_x, test_y = torch.randn(60, 5, generator=g), torch.arange(3).repeat(20)
    for shots, seed in ((1, 0), (5, 3), (10, 1)):
        keep = few_shot_indices(train_y, shots, seed)
        for C in (None, 0.3):
            expected = linear_probe(train_x[keep], train_y[keep], test_x, test_y, seed=seed, C=C)
            assert linear_probe(train_x, train_y, test_x, test_y, shots=shots, seed=seed, C=C) == expected


def test_few_shot_probe_mean_and_std_over_seeds():
    g = torch.Generator().manual_seed(8)
    train_x, train_y = torch.randn(60, 4, generator=g), torch.arange(3).repeat(20)
    test_x, test_y = torch.randn(30, 4, generator=g), torch.arange(3).repeat(10)
    m = few_shot_probe(train_x, train_y, test_x, test_y, shots_list=(1, 4), seeds=(0, 1, 2))
    assert set(m) == {f"lp_{k}shot_{name}{std}" for k in (1, 4) for name in ("acc1", "mean_per_class_recall", "log_loss")
                      for std in ("", "_std")}
    runs = [linear_probe(train_x, train_y, test_x, test_y, shots=4, seed=s)["acc1"] for s in (0, 1, 2)]
    assert m["lp_4shot_acc1"] == pytest.approx(np.mean(runs), abs=1e-12)
    assert m["lp_4shot_acc1_std"] == pytest.approx(np.std(runs, ddof=1), abs=1e-12)
    single = few_shot_probe(train_x, train_y, test_x, test_y, shots_list=(2,), seeds=(5,))
    assert single["lp_2shot_acc1_std"] == 0.0


def test_knn_hand_case():
    # cos to the query (1, 0): x0 1.0 (label 0), x1 0.8 (1), x2 0.6 (1), x3 -1.0 (0); k = 3 keeps x0, x1, x2.
    train_x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 0])
    query, label = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    # majority: 1 vote vs 2 -> class 1 (wrong)
    assert knn_accuracy(train_x, train_y, query, label, k=3, weighting="uniform")["knn_acc1"] == 0.0
    # T = 0.07: e^(1/0.07) > e^(0.8/0.07) + e^(0.6/0.07) -> class 0 (right)
    assert math.exp(1 / 0.07) > math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07)
    assert knn_accuracy(train_x, train_y, query, label, k=3, temperature=0.07)["knn_acc1"] == 1.0
    # T = 10: e^0.1 = 1.105 < e^0.08 + e^0.06 = 2.145 -> class 1 (wrong)
    assert knn_accuracy(train_x, train_y, query, label, k=3, temperature=10.0)["knn_acc1"] == 0.0
    # k = 1: nearest neighbour; tiny temperature must not overflow
    assert knn_accuracy(train_x, train_y, query, label, k=1, temperature=1e-4)["knn_acc1"] == 1.0
    # a 1-1 vote tie goes to the smaller label
    assert knn_accuracy(train_x, train_y, torch.tensor([[0.0, -1.0]]), torch.tensor([0]), k=2,
                        weighting="uniform")["knn_acc1"] == 1.0


def _knn_loop(train_x, train_y, test_x, k, temperature, weighting):
    tr = train_x.double().numpy()
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    predictions = []
    for q in test_x.double().numpy():
        q = q / np.linalg.norm(q)
        sims = [(float(q @ t), j) for j, t in enumerate(tr)]
        neighbours = sorted(sims, key=lambda s: (-s[0], s[1]))[:k]
        votes = {}
        for sim, j in neighbours:
            w = math.exp(sim / temperature) if weighting == "exp" else 1.0
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + w
        best = max(votes.values())
        predictions.append(min(c for c, v in votes.items() if v == best))
    return np.array(predictions)


@pytest.mark.parametrize("weighting,k,temperature",
                         [("exp", 20, 0.07), ("exp", 5, 0.5), ("uniform", 7, 1.0), ("uniform", 1, 1.0)])
def test_knn_matches_brute_force_loop(weighting, k, temperature):
    g = torch.Generator().manual_seed(9)
    train_x, train_y = torch.randn(80, 6, generator=g), torch.randint(0, 5, (80,), generator=g) * 2
    test_x, test_y = torch.randn(40, 6, generator=g), torch.randint(0, 5, (40,), generator=g) * 2
    pred = _knn_loop(train_x, train_y, test_x, k, temperature, weighting)
    for chunk in (None, 7):
        m = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=temperature, weighting=weighting, chunk_size=chunk)
        assert m["knn_acc1"] == pytest.approx((pred == test_y.numpy()).mean(), abs=1e-12)
        assert m["knn_mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(test_y.numpy(), pred), abs=1e-12)


def test_probe_errors():
    x, y = torch.randn(10, 3), torch.arange(2).repeat(5)
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="weighting"):
        knn_accuracy(x, y, x, y, k=3, weighting="cosine")
    with pytest.raises(ValueError, match="temperature"):
        knn_accuracy(x, y, x, y, k=3, temperature=0)
    with pytest.raises(ValueError, match="fewer than shots=6"):
        linear_probe(x, y, x, y, shots=6)
    with pytest.raises(ValueError, match="train_y"):
        linear_probe(x, torch.zeros(10, dtype=torch.long), x, y)
    with pytest.raises(ValueError, match="test_y"):
        linear_probe(x, y, x, y[:5])
    with pytest.raises(ValueError, match="C must be"):
        linear_probe(x, y, x, y, C=-1.0)


def test_c_is_chosen_on_a_20_percent_holdout_then_refit_on_everything(monkeypatch):
    import plait.evaluate.probe as probe

    calls = []
    real_fit = probe._fit

    def recording_fit(x, y, C, seed, max_iter, tol):
        calls.append((len(y), np.bincount(y).tolist(), C))
        return real_fit(x, y, C, seed, max_iter, tol)

    monkeypatch.setattr(probe, "_fit", recording_fit)
    train_x, train_y = _clusters(30, 3, 10, 1.5, seed=10)
    test_x, test_y = _clusters(20, 3, 10, 1.5, seed=11)
    linear_probe(train_x, train_y, test_x, test_y)
    assert [c[:2] for c in calls[:4]] == [(72, [24, 24, 24])] * 4  # 6 of each class's 30 held out
    assert [c[2] for c in calls[:4]] == [0.01, 0.1, 1.0, 10.0]
    assert calls[4][:2] == (90, [30, 30, 30]) and calls[4][2] in (0.01, 0.1, 1.0, 10.0) and len(calls) == 5
    calls.clear()
    linear_probe(train_x, train_y, test_x, test_y, shots=2)  # 2 per class: nothing to hold out -> C = 1
    assert calls == [(6, [2, 2, 2], 1.0)]


def test_log_loss_equals_scikit_learn_log_loss():
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    from plait.evaluate import linear_probe

    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(120, 5, generator=g), torch.randn(60, 5, generator=g)
    train_y = (train_x[:, 0] > 0).long() + (train_x[:, 1] > 0).long()
    test_y = (test_x[:, 0] > 0).long() + (test_x[:, 1] > 0).long()
    got = linear_probe(train_x, train_y, test_x, test_y, C=1.0)["log_loss"]
    scaler = StandardScaler().fit(train_x.numpy())
    model = LogisticRegression(C=1.0, max_iter=1000, tol=1e-3, random_state=0).fit(scaler.transform(train_x.numpy()),
                                                                                   train_y.numpy())
    want = log_loss(test_y.numpy(), model.predict_proba(scaler.transform(test_x.numpy())), labels=np.arange(3))
    assert got == pytest.approx(want, rel=1e-5)


def test_selecting_c_by_log_loss_gives_a_lower_test_cross_entropy():
    from plait.evaluate import linear_probe

    train_x, train_y = _clusters(30, 3, 10, 0.3, seed=0, offset=7)
    test_x, test_y = _clusters(20, 3, 10, 0.3, seed=1, offset=7)
    by_accuracy = linear_probe(train_x, train_y, test_x, test_y)
    by_log_loss = linear_probe(train_x, train_y, test_x, test_y, select_by="log_loss")
    assert by_log_loss["log_loss"] < by_accuracy["log_loss"] and by_log_loss["acc1"] == 1.0
    with pytest.raises(ValueError, match="select_by"):
        linear_probe(train_x, train_y, test_x, test_y, select_by="f1")
