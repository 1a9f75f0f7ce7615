"""``plait eval``: rebuild a saved model from its config and evaluate it on a dataset."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from plait import runtime
from plait.checkpoint import load_checkpoint, load_weights
from plait.config import from_yaml


def load_model(path: str | Path, device: torch.device | None = None):
    """(model, config) from ``model.safetensors`` (exported) or ``checkpoint.pt``; neither runs
    code on load (safetensors, or torch.load with weights_only=True)."""
    from plait.data import build_dataset
    from plait.models import build_model

    path = Path(path)
    if path.suffix == ".safetensors":
        state, config_yaml = load_weights(path)
    else:
        checkpoint = load_checkpoint(path)
        state, config_yaml = checkpoint["model"], checkpoint["config"]
    config = from_yaml(config_yaml)
    options = OmegaConf.to_container(config.data.options, resolve=True) or {}
    sizing = build_dataset(config.data.name, split="train", **options)  # input sizes of the towers
    independent = any(key.startswith("independent_a.") for key in state)
    model = build_model(OmegaConf.to_container(config.model, resolve=True), sizing, independent=independent)
    model.load_state_dict(state)
    return model.to(device or "cpu"), config


def evaluate_saved(path: str | Path, data: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                   out_dir: str | Path | None = None) -> dict:
    """Evaluate saved weights; ``data`` and ``key=value`` overrides change the dataset or eval
    settings. Writes eval.json and gallery.npz into ``out_dir`` if given."""
    from plait.data import build_dataset
    from plait.evaluate.suite import evaluate_model

    model, config = load_model(path)
    if data is not None:
        config.data.name = data
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
    device = runtime.select_device(config.train.device)
    model = model.to(device)
    options = OmegaConf.to_container(config.data.options, resolve=True) or {}
    train_set = build_dataset(config.data.name, split="train", **options)
    test_set = build_dataset(config.data.name, split="test", **options)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return evaluate_model(model, train_set, test_set, config.eval, device, run_dir=out_dir,
                          info={"name": config.name, "dataset": config.data.name, "weights": str(path)})
