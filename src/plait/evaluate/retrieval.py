"""Image <-> text retrieval: recall@k, median and mean rank (CLIP_benchmark's metric names)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from plait._checks import is_int
from plait.evaluate._common import (
    as_features,
    as_labels,
    best_positive,
    check_chunk_size,
    check_ks,
    cosine_scores,
    rank_of,
    same_dim_and_device,
    stable_topk,
    unit_rows,
)
from plait.evaluate.evaluator import evaluator


def retrieval_ranks(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """1-based rank of the first correct item for every query, in both directions.

    Scores are cosine similarities s(t, i); a gallery is ordered by (score desc, index asc), so
    rank = 1 + #{strictly better} + #{equal score, smaller index} and ties never depend on
    ``chunk_size`` (the number of queries scored at once; memory O(chunk_size * gallery); None:
    automatic, at most 2^22 scores at a time).

    Shapes: ``image_features`` (N, d), ``text_features`` (M, d), ``text_to_image`` (M,) with the
    image index of every caption (default: caption i belongs to image i, M = N).
    Returns ``(image_ranks (M,), text_ranks (N,))``: image_ranks[t] is the rank of caption t's
    image among all images; text_ranks[i] is the best rank of any of image i's captions.
    """
    images = as_features(image_features, "image_features")
    texts = as_features(text_features, "text_features")
    same_dim_and_device(images, texts, "image_features", "text_features")
    n_images, n_texts = images.shape[0], texts.shape[0]
    device = images.device
    images, texts = unit_rows(images), unit_rows(texts)
    if text_to_image is None:
        if n_images != n_texts:
            raise ValueError(
                f"image_features has {n_images} rows but text_features has {n_texts}; pass text_to_image "
                "to map each caption to its image"
            )
        owner = torch.arange(n_texts, device=device)
    else:
        owner = as_labels(text_to_image, "text_to_image", n_texts, device)
        if int(owner.min()) < 0 or int(owner.max()) >= n_images:
            bad = int(owner.min()) if int(owner.min()) < 0 else int(owner.max())
            raise ValueError(f"text_to_image holds {bad}, out of range for {n_images} images")
        captions_per_image = torch.bincount(owner, minlength=n_images)
        if bool((captions_per_image == 0).any()):
            missing = int((captions_per_image == 0).nonzero()[0])
            raise ValueError(f"image {missing} has no caption in text_to_image; every image needs at least one")

    image_ranks = []
    step = check_chunk_size(chunk_size, n_texts, n_images)
    for start in range(0, n_texts, step):
        scores = cosine_scores(texts[start : start + step], images)
        image_ranks.append(rank_of(scores, owner[start : start + step]))

    text_ranks = []
    step = check_chunk_size(chunk_size, n_images, n_texts)
    for start in range(0, n_images, step):
        scores = cosine_scores(images[start : start + step], texts)
        rows = torch.arange(start, min(start + step, n_images), device=device)
        positive = owner[None, :] == rows[:, None]
        text_ranks.append(rank_of(scores, best_positive(scores, positive)))
    return torch.cat(image_ranks), torch.cat(text_ranks)


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    text_to_image: Tensor | None = None,
) -> dict[str, float]:
    """Recall@k, median and mean rank of image <-> text retrieval with cosine similarity.

    - ``image_retrieval_recall@k``: fraction of captions whose image is among the top k images.
    - ``text_retrieval_recall@k``: fraction of images with at least one of their captions among
      the top k captions (CLIP's convention, as in CLIP_benchmark).
    - ``{image,text}_retrieval_median_rank`` / ``_mean_rank``: median (numpy's: the mean of the two
      middle values for an even count) and mean over queries of the 1-based rank of the first
      correct item.

    Shapes and tie rule: see :func:`retrieval_ranks`.
    """
    ks = check_ks(ks)
    image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image, chunk_size)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float((image_ranks <= k).double().mean())
        metrics[f"text_retrieval_recall@{k}"] = float((text_ranks <= k).double().mean())
    for direction, ranks in (("image", image_ranks), ("text", text_ranks)):
        ranks = ranks.double()
        metrics[f"{direction}_retrieval_median_rank"] = float(ranks.quantile(0.5))
        metrics[f"{direction}_retrieval_mean_rank"] = float(ranks.mean())
    return metrics


def topk_texts(image_features: Tensor, text_features: Tensor, k: int = 5, chunk_size: int | None = None) -> Tensor:
    """Indices of the k captions most similar to each image, best first (ties: smaller index first).

    Shapes: ``image_features`` (N, d), ``text_features`` (M, d) -> LongTensor (N, k), on the
    features' device. Uses the order of :func:`retrieval_ranks`, so the correct caption appears
    here exactly when its rank is <= k.
    """
    images = as_features(image_features, "image_features")
    texts = as_features(text_features, "text_features")
    same_dim_and_device(images, texts, "image_features", "text_features")
    if not (is_int(k) and 1 <= k <= texts.shape[0]):
        raise ValueError(f"k must be an integer in [1, {texts.shape[0]}] (the number of captions), got {k!r}")
    step = check_chunk_size(chunk_size, images.shape[0], texts.shape[0])
    images, texts = unit_rows(images), unit_rows(texts)
    return torch.cat(
        [stable_topk(cosine_scores(images[start : start + step], texts), k) for start in range(0, images.shape[0], step)]
    )


@evaluator("retrieval")
def retrieval_task(context) -> dict[str, float]:
    """Evaluation task ``retrieval``: :func:`retrieval_metrics` of the test split (a -> b, b -> a)."""
    return retrieval_metrics(*context.test_features())
