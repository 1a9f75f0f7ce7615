"""The evaluation-task registry: a registered task runs in evaluate_model over features computed once."""

import pytest
import torch
from omegaconf import OmegaConf

from plait.config import EvalConfig
from plait.data import DigitsDataset
from plait.evaluate import EVALUATORS, evaluator
from plait.evaluate.suite import evaluate_model
from plait.models import build_model


@pytest.fixture
def pieces():
    train, test = DigitsDataset(split="train", image_size=8), DigitsDataset(split="test", image_size=8)
    model = build_model({"a": {"name": "mlp", "hidden": [16], "out_dim": 8}, "b": {"name": "bow", "out_dim": 8, "embed_dim": 8},
                         "embed_dim": 8}, train)
    return model, train, test


def test_a_registered_task_runs_after_the_builtin_ones_and_reads_shared_features(pieces, monkeypatch):
    import plait.evaluate.suite as suite

    calls = []
    real = suite.embed
    monkeypatch.setattr(suite, "embed", lambda model, dataset, *args: calls.append(len(dataset)) or real(model, dataset, *args))

    @evaluator("mean_norm_test", needs_labels=True)
    def mean_norm(context):
        za, zb = context.test_features()
        return {"mean_norm": float(za.norm(dim=1).mean()), "train_items": float(len(context.probe_features("train")))}

    try:
        model, train, test = pieces
        config = OmegaConf.structured(EvalConfig(tasks=["mean_norm_test", "retrieval", "knn"]))
        metrics = evaluate_model(model, train, test, config, torch.device("cpu"))
    finally:
        EVALUATORS._objects.pop("mean_norm_test")
    names = list(metrics)
    assert names[0].endswith("_retrieval_recall@1") and names[-2:] == ["mean_norm", "train_items"]
    assert metrics["mean_norm"] == pytest.approx(1.0) and metrics["train_items"] == len(train)
    assert "knn_acc1" in metrics or any(key.startswith("knn") for key in metrics)
    assert calls == [len(test), len(train)]  # each split embedded once, whichever tasks read it


def test_a_task_that_needs_labels_is_skipped_for_data_without_them(pieces):
    model, train, test = pieces
    test.labels = {}
    config = OmegaConf.structured(EvalConfig(tasks=["retrieval", "zero_shot", "linear_probe"], label=None))
    metrics = evaluate_model(model, train, test, config, torch.device("cpu"))
    assert metrics and all("retrieval" in key for key in metrics)
