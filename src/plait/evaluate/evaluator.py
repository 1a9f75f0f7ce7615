"""The evaluation-task protocol and its registry, and the features one evaluation shares.

An evaluation task is a function ``task(context: EvaluationContext) -> dict[str, float]``
registered under its name where it is defined, and listed in a config as ``eval.tasks``::

    @evaluator("retrieval")
    def retrieval(context):
        return retrieval_metrics(*context.test_features())

``needs_labels=True``: the task reads a label set (``context.label``) and is skipped (no metrics)
for data without one. Tasks run in registration order; every embedding a task asks the context
for is computed once per evaluation, whichever tasks ask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plait.registry import Registry

EVALUATORS = Registry("evaluation task")
FEATURES = ("shared", "independent", "both")


def evaluator(name: str, *, needs_labels: bool = False) -> Callable:
    """Register ``task`` as the evaluation task ``name`` (a decorator)."""

    def register(task: Callable) -> Callable:
        task.needs_labels = needs_labels
        EVALUATORS.register(name, task)
        return task

    return register


class EvaluationContext:
    """What the tasks of one evaluation read, each computed once: the test split's (z_a, z_b),
    the probes' features (``eval.features``) of the test and training splits, the label set and
    its labels, and text features of prompts. Embeddings are (N, d) float32 on the CPU, in
    dataset order; the global random state is never touched."""

    def __init__(self, model, train_set, test_set, config, device: torch.device):
        self.model, self.train_set, self.test_set, self.config, self.device = model, train_set, test_set, config, device
        self._cache: dict = {}
        label = config.label or (next(iter(test_set.labels)) if test_set.labels else None)
        if label is not None and label not in test_set.labels:
            raise ValueError(f"eval.label={label!r} is not a label set of {type(test_set).__name__}: {sorted(test_set.labels)}")
        self.label = label

    def _embedded(self, split: str, features: str) -> tuple[torch.Tensor, torch.Tensor]:
        from plait.evaluate.suite import embed

        key = (split, features)
        if key not in self._cache:
            dataset = self.test_set if split == "test" else self.train_set
            self._cache[key] = embed(self.model, dataset, self.config.batch_size, self.device, features)
        return self._cache[key]

    def test_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_a, z_b) of the test split, shared features."""
        return self._embedded("test", "shared")

    def probe_features(self, split: str) -> torch.Tensor:
        """z_a of ``split`` (test or train) in ``eval.features`` (shared, independent or both)."""
        return self._embedded(split, self.config.features)[0]

    def labels(self, split: str) -> torch.Tensor:
        """The label set's labels (N,) of ``split`` (test or train)."""
        dataset = self.test_set if split == "test" else self.train_set
        return torch.as_tensor(dataset.labels[self.label])

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), d) text-side features, in batches of ``eval.batch_size``."""
        from plait.evaluate.suite import encode_texts

        return encode_texts(self.model, texts, self.config.batch_size, self.device)
