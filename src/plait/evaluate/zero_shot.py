"""Zero-shot classification with class-name prompts (CLIP's prompt ensembling)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from plait.evaluate._common import (
    as_features,
    as_labels,
    check_chunk_size,
    check_ks,
    cosine_scores,
    mean_per_class_recall,
    rank_of,
    same_dim_and_device,
    unit_rows,
)
from plait.evaluate.evaluator import evaluator


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """prompts[c][t] = templates[t] with class_names[c] put in its ``{}`` (or ``{c}``) slot.

    Encode the (C, T) prompts with the text tower and pass the (C, T, d) features to
    :func:`zero_shot_classifier`.
    """
    if isinstance(class_names, str) or not class_names:
        raise ValueError(f"class_names must be a non-empty sequence of strings, got {class_names!r}")
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty sequence of strings, got {templates!r}")
    for template in templates:
        if not isinstance(template, str) or ("{}" not in template and "{c}" not in template):
            raise ValueError(f"every template needs a '{{}}' slot for the class name, got {template!r}")
    return [[template.format(str(name), c=str(name)) for template in templates] for name in class_names]


def zero_shot_classifier(class_text_features: Tensor) -> Tensor:
    """Class weights w_c = normalize( mean_t normalize(e_ct) ): CLIP's prompt ensembling.

    Shapes: ``class_text_features`` (C, T, d) for T templates, or (C, d) for one; returns the
    (C, d) float32 classifier with unit rows.
    """
    if not isinstance(class_text_features, torch.Tensor):
        raise ValueError(f"class_text_features must be a torch.Tensor, got {type(class_text_features).__name__}")
    if class_text_features.dim() == 2:
        class_text_features = class_text_features[:, None, :]
    if class_text_features.dim() != 3 or 0 in class_text_features.shape:
        raise ValueError(
            f"class_text_features must have shape (classes, templates, dim) or (classes, dim), "
            f"got {tuple(class_text_features.shape)}"
        )
    flat = as_features(class_text_features.reshape(-1, class_text_features.shape[-1]), "class_text_features")
    per_template = F.normalize(flat, dim=1).reshape(class_text_features.shape)
    return F.normalize(per_template.mean(dim=1), dim=1)


def zero_shot_metrics(
    image_features: Tensor,
    classifier: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Top-k accuracy and mean per-class recall of argmax_c cos(image, w_c).

    Keys: ``acc{k}`` for every k in ``ks`` with k <= C (so ``acc5`` needs at least 5 classes) and
    ``mean_per_class_recall`` (top-1 recall averaged over the classes present in ``labels``).
    An image is correct at k when its class ranks <= k in the order (score desc, class index asc).
    Items with a negative label are ignored. Shapes: ``image_features`` (N, d), ``classifier``
    (C, d) (rows are normalised here), ``labels`` (N,) in [0, C) or negative.
    """
    ks = check_ks(ks)
    images = as_features(image_features, "image_features")
    weights = as_features(classifier, "classifier")
    same_dim_and_device(images, weights, "image_features", "classifier")
    labels = as_labels(labels, "labels", images.shape[0], images.device)
    n_classes = weights.shape[0]
    if int(labels.max()) >= n_classes:
        raise ValueError(f"labels holds {int(labels.max())}, out of range for a classifier with {n_classes} classes")
    keep = labels >= 0
    if not bool(keep.any()):
        raise ValueError("labels has no non-negative entry: nothing to evaluate")
    images, labels, weights = unit_rows(images[keep]), labels[keep], unit_rows(weights)
    step = check_chunk_size(chunk_size, images.shape[0], n_classes)
    ranks = torch.cat(
        [
            rank_of(cosine_scores(images[start : start + step], weights), labels[start : start + step])
            for start in range(0, images.shape[0], step)
        ]
    )
    metrics = {f"acc{k}": float((ranks <= k).double().mean()) for k in ks if k <= n_classes}
    metrics["mean_per_class_recall"] = mean_per_class_recall(ranks == 1, labels)
    return metrics


@evaluator("zero_shot", needs_labels=True)
def zero_shot_task(context) -> dict[str, float]:
    """Evaluation task ``zero_shot`` (``zeroshot_*`` metrics): each class's prompts (the dataset's
    templates filled with its class names) through the text tower, averaged into a classifier, on
    the test split's z_a. Only for data whose second view is text and that have templates."""
    test_set = context.test_set
    if not (test_set.modalities[1] == "text" and test_set.templates):
        return {}
    prompts = build_prompts(test_set.class_names[context.label], test_set.templates)
    flat = [p for group in prompts for p in group]
    features = context.text_features(flat).reshape(len(prompts), len(prompts[0]), -1)
    metrics = zero_shot_metrics(context.test_features()[0], zero_shot_classifier(features), context.labels("test"))
    return {f"zeroshot_{key}": value for key, value in metrics.items()}
