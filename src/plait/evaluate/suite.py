"""Evaluate a model on a dataset pair (train for probes, test for everything else).

Runs the registered evaluation tasks a config names (``plait.evaluate.evaluator``: retrieval,
zero_shot, linear_probe, few_shot, knn) over features computed once, and writes ``eval.json``
(CLIP_benchmark-style metric names, flattened with a task prefix where needed) and ``gallery.npz``
(query images with their top-5 retrieved captions) when given a run directory (both atomically).
Metric names follow CLIP_benchmark: ``image_*`` is the a side, ``text_*`` the b side, whatever
the data's modalities.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from plait.atomic import atomic_write, atomic_write_text
from plait.evaluate import EVALUATORS, FEATURES, EvaluationContext

__all__ = ["EVALUATORS", "FEATURES", "embed", "encode_texts", "evaluate_model"]


@torch.no_grad()
def embed(model, dataset, batch_size: int, device: torch.device, features: str = "shared") -> tuple[torch.Tensor, torch.Tensor]:
    """(z_a, z_b) of every item, in dataset order, on the CPU; ``features``: shared,
    independent or both ([z, z^i]). The global random state is not touched (a DataLoader without
    a generator draws its base seed from it), so evaluating during training, a staleness pass or
    a bank refresh leaves the training's random stream (dropout) as it was."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    wide = any(p.dtype == torch.float64 for p in model.parameters())  # train.precision=fp64: float64 inputs

    def place(x):
        if not torch.is_tensor(x):
            return list(x)
        return x.to(device, torch.float64) if wide and x.is_floating_point() else x.to(device)

    za, zb = [], []
    for _, a, b in loader:
        a, b = place(a), place(b)
        za.append(model.encode_a(a, features=features).float().cpu())
        zb.append(model.encode_b(b, features=features).float().cpu())
    return torch.cat(za), torch.cat(zb)


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int, device: torch.device) -> torch.Tensor:
    """(len(texts), d) float32 shared features of ``texts`` from tower b (eval mode, no gradient),
    encoded ``batch_size`` texts at a time, on the CPU: the zero-shot prompts' embeddings."""
    model.eval()
    return torch.cat([model.encode_b(texts[i:i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)])


def evaluate_model(model, train_set, test_set, config, device, run_dir: str | Path | None = None,
                   info: dict | None = None) -> dict:
    """Metrics of ``model`` on ``test_set`` (probes fitted on ``train_set``'s embeddings): every
    task of ``config.tasks`` (the ``eval`` section) in registration order; a task that needs
    labels is skipped for data without a label set."""
    tasks = list(config.tasks)
    unknown = sorted(set(tasks) - set(EVALUATORS))
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; valid: {', '.join(EVALUATORS)}")
    was_training = model.training
    context = EvaluationContext(model, train_set, test_set, config, device)
    za, zb = context.test_features()
    metrics: dict[str, float] = {}
    for name, task in EVALUATORS.items():
        if name in tasks and (context.label is not None or not task.needs_labels):
            metrics.update(task(context))
    if run_dir is not None:
        run_dir = Path(run_dir)
        result = {**(info or {}), "label": context.label, "metrics": metrics}
        atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=1))
        if config.gallery and test_set.modalities == ("image", "text"):
            _write_gallery(test_set, za, zb, config.gallery, run_dir / "gallery.npz")
    model.train(was_training)
    return metrics


def _write_gallery(test_set, za, zb, count: int, path: Path) -> None:
    from plait.evaluate.retrieval import topk_texts

    count = min(count, len(test_set))
    rows = torch.linspace(0, len(test_set) - 1, count).round().long().tolist()
    top = topk_texts(za[rows], zb, k=min(5, len(test_set)))
    images = np.stack([(test_set[i][1].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8) for i in rows])
    captions = np.array([[test_set.texts[j] for j in row] for row in top.tolist()])
    truth = np.array([test_set.texts[i] for i in rows])
    atomic_write(path, lambda handle: np.savez(handle, images=images, captions=captions, truth=truth))
