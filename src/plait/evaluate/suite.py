"""Evaluate a two-tower model on a dataset pair (train for probes, test for everything else).

Writes ``eval.json`` (CLIP_benchmark-style metric names, flattened with a task prefix where
needed) and ``gallery.npz`` (query images with their top-5 retrieved captions) when given a run
directory (both atomically). Tasks: ``retrieval``, ``zero_shot``, ``linear_probe``, ``few_shot``, ``knn``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from plait.atomic import atomic_write, atomic_write_text

TASKS = ("retrieval", "zero_shot", "linear_probe", "few_shot", "knn")
FEATURES = ("shared", "independent", "both")


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
    model.eval()
    return torch.cat([model.encode_b(texts[i:i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)])


def evaluate_model(model, train_set, test_set, config, device, run_dir: str | Path | None = None, info: dict | None = None) -> dict:
    """Metrics of ``model`` on ``test_set`` (probes fitted on ``train_set``'s embeddings)."""
    from plait.evaluate.probe import few_shot_probe, knn_accuracy, linear_probe
    from plait.evaluate.retrieval import retrieval_metrics
    from plait.evaluate.zero_shot import build_prompts, zero_shot_classifier, zero_shot_metrics

    tasks = list(config.tasks)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; valid: {', '.join(TASKS)}")
    was_training = model.training
    za, zb = embed(model, test_set, config.batch_size, device)
    metrics: dict[str, float] = {}
    if "retrieval" in tasks:
        metrics.update(retrieval_metrics(za, zb))

    label = config.label or (next(iter(test_set.labels)) if test_set.labels else None)
    if label is not None and label not in test_set.labels:
        raise ValueError(f"eval.label={label!r} is not a label set of {type(test_set).__name__}: {sorted(test_set.labels)}")
    if label is not None:
        y_test = torch.as_tensor(test_set.labels[label])
        if "zero_shot" in tasks and test_set.modalities[1] == "text" and test_set.templates:
            prompts = build_prompts(test_set.class_names[label], test_set.templates)
            flat = [p for group in prompts for p in group]
            features = encode_texts(model, flat, config.batch_size, device).reshape(len(prompts), len(prompts[0]), -1)
            for key, value in zero_shot_metrics(za, zero_shot_classifier(features), y_test).items():
                metrics[f"zeroshot_{key}"] = value
        if any(task in tasks for task in ("linear_probe", "few_shot", "knn")):
            probe_za = za if config.features == "shared" else embed(model, test_set, config.batch_size, device, config.features)[0]
            train_za, _ = embed(model, train_set, config.batch_size, device, config.features)
            y_train = torch.as_tensor(train_set.labels[label])
            if "linear_probe" in tasks:
                for key, value in linear_probe(train_za, y_train, probe_za, y_test).items():
                    metrics[f"lp_{key}"] = value
            if "few_shot" in tasks:
                metrics.update(few_shot_probe(train_za, y_train, probe_za, y_test, shots_list=tuple(config.few_shot),
                                              seeds=tuple(range(config.few_shot_seeds))))
            if "knn" in tasks:
                metrics.update(knn_accuracy(train_za, y_train, probe_za, y_test))
    if run_dir is not None:
        run_dir = Path(run_dir)
        result = {**(info or {}), "label": label, "metrics": metrics}
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
