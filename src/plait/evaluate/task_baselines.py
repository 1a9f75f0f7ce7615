"""Single-modality baselines for the emoji fusion tasks: how far the text alone or the image alone gets.

For each task (:mod:`plait.data.tasks`), trained on the train split and scored on the test split:

- ``majority``: always the most frequent training label;
- ``kind prior``: per question / statement / hypothesis kind, its most frequent training label
  (what a model that reads only the template gets; the best text-only score when every text has
  each of its possible labels equally often);
- ``text only``: logistic regression on TF-IDF of the text (word 1- and 2-grams);
- ``image only``: logistic regression on the raw pixels, average-pooled to ``pool`` x ``pool`` and
  standardised (reasoning: the two images' pixels concatenated).

A task that needs both modalities has both single-modality rows near the majority / kind prior.
VQA answers outside the training vocabulary (label -1) count as wrong in every row.

    from plait.evaluate.task_baselines import task_baseline_table
    print(task_baseline_table(image_size=16, seed=0))
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from plait.data.tasks import TASKS, EmojiTask

NAMES = {"vqa": "VQA (EmojiVQA)", "reasoning": "reasoning (EmojiReasoning)", "entailment": "entailment (EmojiEntailment)"}


def pixel_features(dataset: EmojiTask, pool: int = 8) -> np.ndarray:
    """(N, 3 * pool * pool) float32, or (N, 2 * 3 * pool * pool) for image pairs: every item's
    image(s) average-pooled to pool x pool, in [0, 1]."""
    images = dataset.emoji.images.float().div_(255.0)
    pooled = F.adaptive_avg_pool2d(images, pool).flatten(1).numpy()  # (M, 3 * pool * pool)
    index = np.asarray(dataset.image_index)
    return pooled[index].reshape(index.shape[0], -1).astype(np.float32)


def _fit_score(x_train, y_train, x_test, y_test, seed: int) -> tuple[float, np.ndarray]:
    model = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    keep = y_train >= 0
    model.fit(x_train[keep], y_train[keep])
    predicted = model.predict(x_test)
    return float(np.mean(predicted == y_test)), predicted


def _kind_prior(train: EmojiTask, test: EmojiTask) -> float:
    best = {}
    for kind in set(train.kinds):
        labels = train.targets[[k == kind for k in train.kinds]]
        labels = labels[labels >= 0]
        best[kind] = int(np.bincount(labels).argmax())
    predicted = np.array([best.get(k, -2) for k in test.kinds])
    return float(np.mean(predicted == test.targets))


def evaluate_task(train: EmojiTask, test: EmojiTask, pool: int = 8, seed: int = 0) -> dict:
    """Accuracies (fractions) of the baselines on ``test`` trained on ``train``, with per-kind
    text-only and image-only accuracies and, for entailment, the text-only neutral recall/precision."""
    y_train, y_test = np.asarray(train.targets), np.asarray(test.targets)
    counts = np.bincount(y_train[y_train >= 0], minlength=train.num_classes)
    result = {"task": train.task, "train_items": len(train), "test_items": len(test), "classes": train.num_classes,
              "majority": float(np.mean(y_test == int(counts.argmax()))), "kind_prior": _kind_prior(train, test),
              "out_of_vocabulary": float(np.mean(y_test < 0))}
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    text_train = vectorizer.fit_transform(train.texts)
    result["text_only"], text_pred = _fit_score(text_train, y_train, vectorizer.transform(test.texts), y_test, seed)
    scaler = StandardScaler()
    pix_train = scaler.fit_transform(pixel_features(train, pool))
    pix_test = scaler.transform(pixel_features(test, pool))
    result["image_only"], image_pred = _fit_score(pix_train, y_train, pix_test, y_test, seed)
    kinds = np.array(test.kinds)
    result["per_kind"] = {
        kind: {"n": int(np.sum(kinds == kind)),
               "text_only": float(np.mean(text_pred[kinds == kind] == y_test[kinds == kind])),
               "image_only": float(np.mean(image_pred[kinds == kind] == y_test[kinds == kind]))}
        for kind in test.KINDS if np.any(kinds == kind)
    }
    if "neutral" in test.label_names:
        neutral = test.label_names.index("neutral")
        said, truly = text_pred == neutral, y_test == neutral
        result["text_neutral_recall"] = float(np.mean(said[truly]))
        result["text_neutral_precision"] = float(np.mean(truly[said])) if said.any() else 0.0
    return result


def task_baselines(image_size: int = 16, seed: int = 0, pool: int = 8, cache_dir=None, **options) -> dict:
    """{task: :func:`evaluate_task` result} for vqa, reasoning and entailment, each built with
    ``seed`` (items) and ``image_size`` on the train and test splits. ``options`` go to every task
    constructor that accepts them (e.g. ``per_image``, ``pairs``)."""
    import inspect

    results = {}
    for name, cls in TASKS.items():
        accepted = set(inspect.signature(cls.__init__).parameters)
        mine = {k: v for k, v in options.items() if k in accepted}
        train = cls("train", image_size=image_size, seed=seed, cache_dir=cache_dir, **mine)
        test = cls("test", image_size=image_size, seed=seed, cache_dir=cache_dir, **mine)
        results[name] = evaluate_task(train, test, pool=pool, seed=seed)
    return results


def format_table(results: dict) -> str:
    """Markdown: one row per task, accuracies in %."""
    lines = ["| task | train / test items | classes | majority | kind prior | text only | image only |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {NAMES.get(name, name)} | {r['train_items']} / {r['test_items']} | {r['classes']} | "
                     f"{100 * r['majority']:.1f} | {100 * r['kind_prior']:.1f} | {100 * r['text_only']:.1f} | "
                     f"{100 * r['image_only']:.1f} |")
    notes = []
    if "vqa" in results:
        notes.append(f"VQA test answers outside the training vocabulary: "
                     f"{100 * results['vqa']['out_of_vocabulary']:.2f}% (counted wrong).")
    if "entailment" in results and "text_neutral_recall" in results["entailment"]:
        r = results["entailment"]
        notes.append(f"Entailment, text only, on 'neutral': recall {100 * r['text_neutral_recall']:.1f}%, "
                     f"precision {100 * r['text_neutral_precision']:.1f}% (chance precision 33.3%).")
    return "\n".join(lines + [""] + notes)


def format_kind_table(results: dict) -> str:
    """Markdown: per task and kind, test items and text-only / image-only accuracy in %."""
    lines = ["| task | kind | test items | text only | image only |", "|---|---|---|---|---|"]
    for name, r in results.items():
        for kind, v in r["per_kind"].items():
            lines.append(f"| {name} | {kind} | {v['n']} | {100 * v['text_only']:.1f} | {100 * v['image_only']:.1f} |")
    return "\n".join(lines)


def task_baseline_table(image_size: int = 16, seed: int = 0, pool: int = 8, cache_dir=None, per_kind: bool = False,
                        **options) -> str:
    """The baseline table (markdown) for the three tasks; ``per_kind`` adds the per-kind table."""
    results = task_baselines(image_size=image_size, seed=seed, pool=pool, cache_dir=cache_dir, **options)
    table = format_table(results)
    return table + ("\n\n" + format_kind_table(results) if per_kind else "")
