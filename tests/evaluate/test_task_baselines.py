"""Single-modality baselines of the emoji tasks, against bounds and rates recomputed here."""

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from plait.data.tasks import EmojiEntailment, EmojiReasoning, EmojiVQA
from plait.evaluate.task_baselines import evaluate_task, format_table, pixel_features, task_baseline_table

SIZE = 8


def best_from(keys, labels) -> float:
    """The best accuracy of any prediction that is a function of ``keys`` (the Bayes bound on this set)."""
    by = defaultdict(Counter)
    for key, label in zip(keys, labels):
        by[key][int(label)] += 1
    return sum(max(c.values()) for c in by.values()) / len(labels)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A temporary image cache for this module (never ~/.cache/plait)."""
    return tmp_path_factory.mktemp("plait-cache")


@pytest.fixture(scope="module")
def results(cache):
    out = {}
    for cls, options in ((EmojiVQA, {"per_image": 0.5}), (EmojiReasoning, {}), (EmojiEntailment, {})):
        train = cls("train", image_size=SIZE, cache_dir=cache, **options)
        test = cls("test", image_size=SIZE, cache_dir=cache, **options)
        out[cls.task] = (train, test, evaluate_task(train, test))
    return out


def test_rates_recomputed(results):
    for name, (train, test, r) in results.items():
        y = np.asarray(test.targets)
        majority = Counter(train.targets.tolist()).most_common(1)[0][0]
        assert r["majority"] == pytest.approx(np.mean(y == majority))
        prior = {k: Counter(t for t, kk in zip(train.targets, train.kinds) if kk == k).most_common(1)[0][0]
                 for k in set(train.kinds)}
        assert r["kind_prior"] == pytest.approx(np.mean([prior[k] == t for k, t in zip(test.kinds, y)]))
        assert r["out_of_vocabulary"] == pytest.approx(np.mean(y < 0))
        assert r["test_items"] == len(test) and r["classes"] == test.num_classes


def test_single_modalities_at_chance(results):
    for name, (train, test, r) in results.items():
        texts = best_from(test.texts, test.targets)
        images = best_from([tuple(np.atleast_1d(j)) for j in test.image_index], test.targets)
        assert r["text_only"] <= texts + 1e-12 and r["image_only"] <= images + 1e-12
        if name == "reasoning":  # every statement and every pair as often true as false
            assert texts == images == 0.5 and r["text_only"] == r["image_only"] == 0.5
        if name == "entailment":  # every image and every exact text once per label: both single modalities at chance
            assert images == pytest.approx(1 / 3) and r["image_only"] == pytest.approx(1 / 3)
            assert texts == pytest.approx(1 / 3) and r["text_only"] == pytest.approx(1 / 3)
        if name == "vqa":  # text-only is the question-kind prior, image-only below the majority answer
            assert abs(r["text_only"] - r["kind_prior"]) < 0.02 and r["image_only"] < r["majority"] + 0.02
        assert set(r["per_kind"]) == set(test.kinds)


def test_pixel_features(results):
    _, test, _ = results["reasoning"]
    x = pixel_features(test, pool=4)
    assert x.shape == (len(test), 2 * 3 * 4 * 4) and x.dtype == np.float32
    left, right = test.image_index[5]
    pooled = torch.nn.functional.avg_pool2d(test.emoji.images[[left, right]].float() / 255, SIZE // 4)
    assert np.allclose(x[5], pooled.flatten().numpy(), atol=1e-6)


def test_table(results, cache):
    table = format_table({name: r for name, (_, _, r) in results.items()})
    assert table.count("\n| ") == 3 and "| reasoning (EmojiReasoning) | 6228 / 1656 | 2 | 50.0 | 50.0 | 50.0 | 50.0 |" in table
    small = task_baseline_table(image_size=SIZE, seed=1, per_image=0.2, pairs=60, cache_dir=cache)
    assert small.startswith("| task |") and "| 120 / 120 | 2 |" in small and "outside the training vocabulary" in small
