"""``plait finetune``: a pre-trained fusion model fine-tuned and evaluated on an emoji task.

    plait finetune runs/fusion/model.safetensors --task vqa|reasoning|entailment [key=value ...]

The backbone (image, text and fusion encoders) comes from a fusion run's ``model.safetensors``
or ``checkpoint.pt`` (loaded as data, see ``plait.evaluate.run.load_model``); a task head
(``plait.models.fusion.FusionClassifier``) is put on it and everything is trained with
AdamW (warm-up + cosine, gradient clipping) on the task's training split minus a validation
tenth carved by base emoji. Accuracy on the validation split is logged every epoch
(``metrics.jsonl``); ``finetune.json`` holds the final validation and test accuracy, written
atomically. Deterministic under ``seed`` on the CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from plait import runtime
from plait.atomic import atomic_write_text
from plait.config import apply_overrides
from plait.config.schema import FinetuneConfig
from plait.config.validate import validate_finetune
from plait.training.metrics import MetricsLog
from plait.training.step import OptimizerStep


def finetune_config(task: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """The fine-tuning settings: defaults <- ``task`` <- ``key=value`` overrides (errors name the override)."""
    config = OmegaConf.structured(FinetuneConfig)
    config.task = task
    config = apply_overrides(config, overrides)
    validate_finetune(config)
    return config


def check_no_leak(pretrain, config, weights) -> None:
    """The task's test emoji must not have been pre-training pairs: the backbone must have been
    pre-trained on emoji's training split with the task's split (``test_fraction``, ``seed``)."""
    options = OmegaConf.to_container(pretrain.data.options) or {}
    task = OmegaConf.to_container(config.task_options) or {}
    wanted = {"test_fraction": task.get("test_fraction", 0.2), "seed": task.get("split_seed", 0)}
    used = {"test_fraction": options.get("test_fraction", 0.2), "seed": options.get("seed", 0)}
    if pretrain.data.name not in ("emoji", "twemoji") or used != wanted:
        raise ValueError(f"{weights}: pre-trained on {pretrain.data.name} with {used}, the {config.task} task splits emoji with "
                         f"{wanted}: its test emoji could have been pre-training pairs "
                         "(set task_options.test_fraction / split_seed to match)")


def _loader(dataset, batch_size: int, generator: torch.Generator | None = None):
    from plait.data.tasks import collate_task

    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None,
                                       drop_last=generator is not None, collate_fn=collate_task, generator=generator)


@torch.no_grad()
def accuracy(classifier: nn.Module, dataset, batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy of ``classifier`` on a task dataset (labels of -1, answers outside the
    training vocabulary, count as wrong)."""
    was_training = classifier.training
    classifier.eval()
    correct = total = 0
    for _, images, texts, labels in _loader(dataset, batch_size):
        predicted = classifier(images.to(device), list(texts)).argmax(1).cpu()
        correct += int((predicted == labels).sum())
        total += len(labels)
    classifier.train(was_training)
    return correct / max(total, 1)


def _optimizer_step(classifier: nn.Module, config, total: int) -> OptimizerStep:
    """AdamW with the head at ``head_lr_multiplier`` x lr (no decay on biases and norms), warm-up +
    cosine over ``total`` steps, clipping at ``grad_clip`` (0: none)."""
    from plait.optim import parameter_groups, warmup_cosine

    head = set(map(id, classifier.head.parameters()))
    groups = []
    for group in parameter_groups(classifier, config.weight_decay):
        for keep_head, multiplier in ((False, 1.0), (True, config.head_lr_multiplier)):
            params = [p for p in group["params"] if (id(p) in head) == keep_head]
            if params:
                groups.append({"params": params, "weight_decay": group["weight_decay"], "lr": config.lr * multiplier})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, max(1, int(config.warmup_fraction * total))))
    return OptimizerStep(optimizer, scheduler, grad_clip=max(float(config.grad_clip), 0.0))


def _fit(classifier: nn.Module, fit_set, validation_set, config, device: torch.device, out: Path) -> int:
    """Train ``classifier`` (cross-entropy) for ``epochs`` (at most ``max_steps`` steps), logging each
    epoch's mean loss, lr and validation accuracy to ``out/metrics.jsonl``; returns the steps taken."""
    total = config.epochs * (len(fit_set) // config.batch_size)
    total = min(total, config.max_steps) if config.max_steps else total
    update = _optimizer_step(classifier, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out, is_main=True, tensorboard=False, fresh=True)  # the first epoch's line replaces an old log
    step, start = 0, time.perf_counter()
    classifier.train()
    for epoch in range(config.epochs):
        running = []
        for index, images, texts, labels in _loader(fit_set, config.batch_size, generator):
            logits = classifier(images.to(device), list(texts))
            loss = nn.functional.cross_entropy(logits.float(), labels.to(device))
            update.zero_grad()
            update.scale(loss).backward()
            if not update(loss.detach(), classifier.parameters()).finite:
                what = "loss" if not bool(torch.isfinite(loss.detach())) else "gradient"
                raise ValueError(f"non-finite {what} at fine-tuning step {step} "
                                 f"(epoch {epoch}, items {index[:8].tolist()}); lower lr")
            running.append(float(loss.detach()))
            step += 1
            if step >= total:
                break
        record = {"step": step, "epoch": epoch + 1, "loss": sum(running) / max(len(running), 1),
                  "lr": update.scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start}
        if validation_set is not None:
            record["validation_accuracy"] = accuracy(classifier, validation_set, config.eval_batch_size, device)
        log.append(record)
        if step >= total:
            break
    return step


def finetune(weights: str | Path, task: str, overrides: list[str] | tuple[str, ...] = (), allow_import: bool = False) -> dict:
    """Fine-tune the fusion backbone of ``weights`` on ``task``; returns (and writes) the metrics."""
    from plait.data.tasks import build_task, carve_task_validation
    from plait.evaluate.run import load_model
    from plait.models.fusion import FusionClassifier, FusionModel

    config = finetune_config(task, overrides)
    backbone, pretrain = load_model(weights, allow_import=allow_import)
    if not isinstance(backbone, FusionModel):
        raise ValueError(f"{weights}: fine-tuning needs a fusion model (model.kind: fusion), this is a {type(backbone).__name__}")
    check_no_leak(pretrain, config, weights)
    out = Path(config.output_dir or Path(weights).parent / f"finetune-{config.task}")
    runtime.seed_everything(config.seed)
    device = runtime.select_device(config.device)
    options = {"image_size": backbone.image_size, **(OmegaConf.to_container(config.task_options) or {})}
    try:
        train_set = build_task(config.task, split="train", **options)
        test_set = build_task(config.task, split="test", **options)
    except TypeError as error:  # an option the task does not take
        raise ValueError(f"task_options for {config.task}: {error}") from None
    fit_set, validation_set = (carve_task_validation(train_set, config.validation_fraction, seed=0)
                               if config.validation_fraction else (train_set, None))
    if len(fit_set) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {len(fit_set)} training items")
    classifier = FusionClassifier(backbone, config.task, num_classes=train_set.num_classes, dropout=config.dropout).to(device)
    step = _fit(classifier, fit_set, validation_set, config, device, out)
    metrics = {"test_accuracy": accuracy(classifier, test_set, config.eval_batch_size, device)}
    if validation_set is not None:
        metrics["validation_accuracy"] = accuracy(classifier, validation_set, config.eval_batch_size, device)
    result = {"task": config.task, "weights": str(weights), "steps": step, "train_items": len(fit_set),
              "test_items": len(test_set), "num_classes": train_set.num_classes, "metrics": metrics,
              "pretrain": {"loss": pretrain.loss.name, "regularizers": [dict(r) for r in pretrain.regularizers]},
              "config": OmegaConf.to_container(config)}
    atomic_write_text(out / "finetune.json", json.dumps(result, indent=1) + "\n")
    return result
