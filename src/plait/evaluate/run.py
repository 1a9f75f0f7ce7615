"""``plait eval``: rebuild a saved model from the config stored with it and evaluate it.

A saved model (``model.safetensors`` or ``checkpoint.pt``) is data: the stored config is read
by :func:`plait.config.load_stored_config` (validated, never interpolated, registered names
only; ``allow_import`` is the command line's ``--allow-import``) and the towers are sized from
the stored input spec, so loading never runs code, reads the environment or needs the training
data. The evaluation data default to the run's dataset; ``data=`` names another one (its
options start empty) and ``key=value`` overrides change any data or eval setting, e.g.
``data.options.path=moved/pairs.csv``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from omegaconf import DictConfig, OmegaConf

from plait import runtime
from plait.checkpoint import load_checkpoint, load_weights
from plait.config import load_stored_config


def load_model(path: str | Path, device: torch.device | None = None, allow_import: bool = False):
    """(model, config) from ``model.safetensors`` (exported) or ``checkpoint.pt``."""
    from plait.models import build_model, check_input_spec

    path = Path(path)
    if path.suffix == ".safetensors":
        state, config_yaml, inputs = load_weights(path, with_inputs=True)
    else:
        checkpoint = load_checkpoint(path)
        if "model" not in checkpoint or "config" not in checkpoint:
            raise ValueError(f"checkpoint {path} has no model or no config")
        state, config_yaml, inputs = checkpoint["model"], checkpoint["config"], checkpoint.get("inputs")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: the model entry is not a mapping of names to tensors")
    config = load_stored_config(config_yaml, source=str(path), allow_import=allow_import)
    if inputs is None:  # written before input specs were stored: size the towers from the training data
        from plait.data import build_dataset

        options = OmegaConf.to_container(config.data.options, resolve=False) or {}
        inputs = build_dataset(config.data.name, split="train", **options)
    else:
        inputs = check_input_spec(inputs, source=str(path))
    independent = any(key.startswith("independent_a.") for key in state)
    model = build_model(OmegaConf.to_container(config.model, resolve=False), inputs, independent=independent,
                        allow_import=allow_import)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and not nn.parameter.is_lazy(expected[k]) and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                   f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(expected[wrong[0]].shape)}" if wrong else ""]
        raise ValueError(f"{path}: its tensors do not fit the model its config describes: {'; '.join(d for d in details if d)}")
    model.load_state_dict(state)
    model.model_inputs = inputs if isinstance(inputs, dict) else None
    return model.to(device or "cpu"), config


def evaluation_config(config: DictConfig, data: str | None, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """The stored config with another dataset (options reset) and command-line overrides."""
    from plait.config import load_config

    if data is not None and data != config.data.name:
        config.data.name = data
        config.data.options = {}
    # overrides are checked as load_config checks them, then merged over the stored config
    load_config(None, list(overrides))
    for item in overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist([item]))
    return config


def check_data_fits(model, dataset, path: str | Path) -> None:
    """The evaluation data give the views the model was trained on (modality and shape)."""
    from plait.models import input_spec

    wanted = getattr(model, "model_inputs", None)
    if wanted is None:
        return
    given = input_spec(dataset)
    for side, k in (("a", 0), ("b", 1)):
        if wanted["modalities"][k] != given["modalities"][k] or wanted["shapes"][k] != given["shapes"][k]:
            def show(spec):
                shape = spec["shapes"][k]
                return spec["modalities"][k] + ("" if shape is None else " of shape " + "x".join(map(str, shape)))

            hint = "; set data.options.image_size to match" if wanted["modalities"][k] == "image" == given["modalities"][k] else ""
            raise ValueError(f"{path}: tower {side} takes {show(wanted)}, the evaluation data give {show(given)}{hint}")


def evaluate_saved(path: str | Path, data: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                   out_dir: str | Path | None = None, allow_import: bool = False) -> dict:
    """Evaluate saved weights on the test split of the run's dataset (or of ``data`` /
    overrides). Writes eval.json and gallery.npz into ``out_dir`` if given."""
    from plait.data import build_dataset
    from plait.evaluate.suite import TASKS, evaluate_model

    model, config = load_model(path, allow_import=allow_import)
    config = evaluation_config(config, data, overrides)
    unknown = sorted(set(config.eval.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; valid: {', '.join(TASKS)}")
    device = runtime.select_device(config.train.device)
    model = model.to(device)
    options = OmegaConf.to_container(config.data.options, resolve=True) or {}  # only the command line's own ${...}
    train_set = build_dataset(config.data.name, split="train", **dict(options))
    test_set = build_dataset(config.data.name, split="test", **dict(options))
    if len(test_set) == 0:
        raise ValueError(f"dataset {config.data.name!r} has no test split to evaluate; "
                         "set data.options.test_fraction or data.options.test_path")
    check_data_fits(model, test_set, path)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return evaluate_model(model, train_set, test_set, config.eval, device, run_dir=out_dir,
                          info={"name": config.name, "dataset": config.data.name, "weights": str(path)})
