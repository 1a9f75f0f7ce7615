from fractions import Fraction

import numpy as np
import pytest
import torch

from plait.evaluate import retrieval_metrics, retrieval_ranks, topk_texts

# Hand case: images are one-hot, so cos(text j, image i) = S[j, i] / |S_j|; every row of S is a
# permutation of (4, 3, 2, 1), so all rows share one norm and the scores order like S itself.
S = torch.tensor([[4.0, 3, 2, 1], [4, 3, 2, 1], [4, 1, 2, 3], [3, 4, 2, 1]])
IMAGES = torch.eye(4)


def test_hand_case_recalls_and_ranks():
    # Text j retrieves images: its image j scores S[j, j] = 4, 3, 2, 1 -> ranks 1, 2, 3, 4.
    # Image i retrieves texts (column i), ties broken by the smaller index:
    #   col0 [4,4,4,3] -> t0 first, rank 1;  col1 [3,3,1,4] -> t3, t0, then t1: rank 3;
    #   col2 [2,2,2,2] -> t0, t1, then t2: rank 3;  col3 [1,1,3,1] -> t2, t0, t1, then t3: rank 4.
    image_ranks, text_ranks = retrieval_ranks(IMAGES, S)
    assert image_ranks.tolist() == [1, 2, 3, 4]
    assert text_ranks.tolist() == [1, 3, 3, 4]
    m = retrieval_metrics(IMAGES, S, ks=(1, 2, 3, 4))
    assert [m[f"image_retrieval_recall@{k}"] for k in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert [m[f"text_retrieval_recall@{k}"] for k in (1, 2, 3, 4)] == [0.25, 0.25, 0.75, 1.0]
    assert m["image_retrieval_median_rank"] == 2.5 and m["image_retrieval_mean_rank"] == 2.5
    assert m["text_retrieval_median_rank"] == 3.0 and m["text_retrieval_mean_rank"] == 2.75
    assert set(retrieval_metrics(IMAGES, S)) == {
        *(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
        *(f"{d}_retrieval_{s}_rank" for d in ("image", "text") for s in ("median", "mean")),
    }


def test_hand_case_topk_texts_uses_the_same_tie_rule():
    top = topk_texts(IMAGES, S, k=4)
    assert top.dtype == torch.long
    assert top.tolist() == [[0, 1, 2, 3], [3, 0, 1, 2], [0, 1, 2, 3], [2, 0, 1, 3]]
    assert topk_texts(IMAGES, S, k=2, chunk_size=3).tolist() == [[0, 1], [3, 0], [0, 1], [2, 0]]


def test_several_captions_per_image_hand_case():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.5], [1.0, 0.0], [0.2, 1.0]])
    owner = torch.tensor([0, 0, 1, 1])
    # image 0 ranks texts t2 (1.0), t1 (0.89), t3, t0: its best caption t1 is 2nd; image 1: t0, t3, ...: t3 is 2nd.
    # captions: t0 ranks image 1 first (its image 0 is 2nd), t1 -> image 0 (1st), t2 -> image 0 (2nd), t3 -> 1st.
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image=owner)
    assert image_ranks.tolist() == [2, 1, 2, 1] and text_ranks.tolist() == [2, 2]
    m = retrieval_metrics(images, texts, ks=(1, 2), text_to_image=owner)
    assert m["text_retrieval_recall@1"] == 0.0 and m["text_retrieval_recall@2"] == 1.0
    assert m["image_retrieval_recall@1"] == 0.5 and m["image_retrieval_median_rank"] == 1.5


def _exact_ranks(queries: np.ndarray, gallery: np.ndarray, positives: list[set[int]]) -> list[int]:
    """Brute force with exact arithmetic on integer features: cos order = sign(q.g) (q.g)^2 / |g|^2."""
    ranks = []
    for q, pos in zip(queries, positives):
        keys = []
        for j, g in enumerate(gallery):
            dot, norm = int(q @ g), int(g @ g)
            keys.append((-(Fraction(dot * abs(dot), norm) if norm else Fraction(0)), j))
        order = [j for _, j in sorted(keys)]
        ranks.append(1 + min(order.index(j) for j in pos))
    return ranks


def _integer_features(generator, n, d, duplicates):
    x = torch.randint(-2, 3, (n, d), generator=generator)
    for src, dst in duplicates:
        x[dst] = x[src]
    return x


@pytest.mark.parametrize("multi", [False, True])
def test_matches_exact_brute_force_with_ties(multi):
    g = torch.Generator().manual_seed(1)
    images = _integer_features(g, 17, 4, [(0, 5), (3, 11), (3, 12)])
    if multi:
        owner = torch.cat([torch.arange(17), torch.randint(0, 17, (13,), generator=g)])
        texts = _integer_features(g, 30, 4, [(1, 20), (2, 25), (7, 29)])
    else:
        owner, texts = torch.arange(17), _integer_features(g, 17, 4, [(1, 9), (2, 16)])
    image_ranks, text_ranks = retrieval_ranks(images.float(), texts.float(), text_to_image=owner)
    i_np, t_np, o = images.numpy(), texts.numpy(), owner.tolist()
    assert image_ranks.tolist() == _exact_ranks(t_np, i_np, [{o[t]} for t in range(len(o))])
    assert text_ranks.tolist() == _exact_ranks(i_np, t_np, [{t for t in range(len(o)) if o[t] == i} for i in range(17)])
    m = retrieval_metrics(images.float(), texts.float(), ks=(1, 3), text_to_image=owner)
    expected = np.array(_exact_ranks(i_np, t_np, [{t for t in range(len(o)) if o[t] == i} for i in range(17)]))
    assert m["text_retrieval_median_rank"] == np.median(expected)
    assert m["text_retrieval_mean_rank"] == pytest.approx(expected.mean(), abs=1e-12)
    assert m["text_retrieval_recall@3"] == pytest.approx((expected <= 3).mean(), abs=1e-12)


@pytest.mark.parametrize("multi", [False, True])
def test_chunked_equals_full_matrix_exactly(multi):
    g = torch.Generator().manual_seed(2)
    n = 37
    images = torch.randn(n, 16, generator=g)
    images[10] = images[3]  # exact ties
    images[20] = images[3]
    images[30:] = torch.randint(-1, 2, (7, 16), generator=g).float()  # many near-ties and ties
    if multi:
        owner = torch.cat([torch.arange(n), torch.randint(0, n, (40,), generator=g)])
        texts = torch.randn(len(owner), 16, generator=g)
    else:
        owner, texts = None, torch.randn(n, 16, generator=g)
    texts[5] = texts[4]
    texts[-3:] = torch.randint(-1, 2, (3, 16), generator=g).float()
    full = retrieval_metrics(images, texts, ks=(1, 2, 5, 10), text_to_image=owner)
    full_ranks = retrieval_ranks(images, texts, owner)
    full_top = topk_texts(images, texts, k=7)
    for chunk in (1, 2, 3, 8, n, len(texts), 1000):
        assert retrieval_metrics(images, texts, ks=(1, 2, 5, 10), chunk_size=chunk, text_to_image=owner) == full
        ranks = retrieval_ranks(images, texts, owner, chunk_size=chunk)
        assert torch.equal(ranks[0], full_ranks[0]) and torch.equal(ranks[1], full_ranks[1])
        assert torch.equal(topk_texts(images, texts, k=7, chunk_size=chunk), full_top)


def _clip_benchmark_recall(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's rule, written out: a query hits when any positive is in its top k."""
    top = scores.topk(k, dim=1).indices
    return positive.gather(1, top).any(1).double().mean().item()


def test_matches_clip_benchmark_recall_without_ties():
    g = torch.Generator().manual_seed(3)
    owner = torch.cat([torch.arange(50), torch.randint(0, 50, (70,), generator=g)])
    images, texts = torch.randn(50, 8, generator=g), torch.randn(120, 8, generator=g)
    scores = torch.nn.functional.normalize(texts, dim=1) @ torch.nn.functional.normalize(images, dim=1).T
    positive = owner[:, None] == torch.arange(50)[None, :]
    m = retrieval_metrics(images, texts, ks=(1, 5, 10), chunk_size=16, text_to_image=owner)
    for k in (1, 5, 10):
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(_clip_benchmark_recall(scores, positive, k), abs=1e-9)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(_clip_benchmark_recall(scores.T, positive.T, k), abs=1e-9)


def test_scale_dtype_and_perfect_alignment():
    x = torch.randn(20, 6)
    m = retrieval_metrics(x.half(), 3.0 * x.double(), ks=(1,))
    assert m["image_retrieval_recall@1"] == 1.0 and m["text_retrieval_recall@1"] == 1.0
    assert m["image_retrieval_median_rank"] == 1.0 and m["text_retrieval_mean_rank"] == 1.0


def test_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="image 3 has no caption"):
        retrieval_metrics(x, torch.randn(5, 3), text_to_image=torch.tensor([0, 0, 1, 2, 2]))
    with pytest.raises(ValueError, match="text_to_image holds 4"):
        retrieval_metrics(x, torch.randn(4, 3), text_to_image=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(x, x, chunk_size=0)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, x, ks=(0,))
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match="image_features"):
        retrieval_metrics(torch.randn(4), x)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((4, 3), float("nan")), x)
    with pytest.raises(ValueError, match="k must be"):
        topk_texts(x, x, k=5)
