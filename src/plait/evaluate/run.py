"""``plait eval``: rebuild a saved model from the config stored with it and evaluate it.

A saved model (``model.safetensors`` or ``checkpoint.pt``) is data: the stored config is read
by :func:`plait.config.load_stored_config` (validated, never interpolated, registered names
only; ``allow_import`` is the command line's ``--allow-import``), and the towers are sized from
the stored input spec, so loading never runs code, reads the environment or needs the training
data. The model is first built on the meta device (shapes only) and compared with the file's
tensors, so a crafted config cannot make plait allocate more than the file holds.

No file name or directory inside a saved file is ever followed: a CSV or folder dataset is
read only from the ``data.options.path`` (and ``test_path``) given on the command line, and a
stored ``cache_dir`` is dropped (the default cache is used). The other stored data options must
be plain values. The evaluation data default to the run's dataset; ``data=`` names another one
(its options start empty) and ``key=value`` overrides change ``data.*``, ``eval.*``,
``train.device`` (default ``auto``, whatever device the run trained on) and ``name``; the model
is the file's (``model.*`` and the training settings are refused).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from plait import runtime
from plait.atomic import display_path
from plait.checkpoint import load_checkpoint, load_weights
from plait.config import load_stored_config

# dataset options that name files or directories: never taken from a saved file's config
PATH_OPTIONS = ("path", "test_path", "folder", "cache_dir")
# what a command-line override of plait eval may set (the rest is the file's: the model, how it was trained)
EVAL_KEYS = ("name", "data", "eval", "train.device")


def read_saved(path: str | Path, allow_import: bool = False) -> tuple[dict, DictConfig, dict | None]:
    """(state dict, stored config, input spec or None) of ``model.safetensors`` or ``checkpoint.pt``,
    every part checked; nothing is built."""
    from plait.models import check_input_spec

    path = Path(path)
    shown = display_path(path)
    if path.suffix == ".safetensors":
        state, config_yaml, inputs = load_weights(path, with_inputs=True)
    else:
        checkpoint = load_checkpoint(path)
        if "model" not in checkpoint or "config" not in checkpoint:
            raise ValueError(f"checkpoint {shown} has no model or no config")
        state, config_yaml, inputs = checkpoint["model"], checkpoint["config"], checkpoint.get("inputs")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{shown}: the model entry is not a mapping of names to tensors")
    config = load_stored_config(config_yaml, source=shown, allow_import=allow_import)
    if inputs is not None:
        inputs = check_input_spec(inputs, source=shown)
    return state, config, inputs


def stored_data_options(config: DictConfig, source: str) -> tuple[dict, dict]:
    """(options, dropped): the stored ``data.options`` without the file names and directories of
    ``PATH_OPTIONS`` (``dropped``; ``cache_dir: false``, memory only, is kept), the rest checked to
    be plain values (numbers, strings, booleans, null, lists of them)."""
    options = OmegaConf.to_container(config.data.options, resolve=False) or {}

    def plain(value) -> bool:
        return value is None or isinstance(value, (bool, int, float, str))

    for key, value in options.items():
        if not (isinstance(key, str)
                and (plain(value) or (isinstance(value, list) and len(value) <= 64 and all(map(plain, value))))):
            raise ValueError(f"{source}: stored data option {str(key)[:40]!r} is not a plain value "
                             f"({str(value)[:60]!r}); refused")
    dropped = {key: options.pop(key) for key in PATH_OPTIONS
               if key in options and not (key == "cache_dir" and options[key] is False)}
    return options, dropped


def build_saved_model(path: str | Path, state: dict, config: DictConfig, inputs, allow_import: bool = False,
                      legacy: bool = False) -> nn.Module:
    """The model a file's config describes, sized from ``inputs`` (an input spec or a dataset),
    loaded with ``state``. Its shapes are checked on the meta device first: nothing larger than the
    file's own tensors is allocated. ``legacy``: the file has no input spec (the towers are sized
    from the evaluation data; a mismatch says so)."""
    from plait.models import build_model, input_spec

    shown = display_path(path)
    # heads of modality-specific features (feature separation): the two-tower's and the fusion model's names
    independent = any(key.startswith(("independent_a.", "vision_ind.")) for key in state)
    spec = OmegaConf.to_container(config.model, resolve=False)
    try:
        probe = build_model(spec, inputs, independent=independent, allow_import=allow_import, device="meta")
    except ValueError as error:  # a size or an encoder option of the file's config
        raise ValueError(f"{shown}: {error}") from None
    expected = probe.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and not nn.parameter.is_lazy(expected[k]) and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                   f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                   (f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model {tuple(expected[wrong[0]].shape)}"
                    if wrong else "")]
        details = "; ".join(d for d in details if d)
        if legacy:
            given = inputs if isinstance(inputs, dict) else input_spec(inputs)
            raise ValueError(f"{shown}: this file has no input spec, so its towers were sized from the evaluation data "
                             f"({_show_view(given, 0)}; {_show_view(given, 1)}), and its tensors do not fit them: {details}; "
                             "evaluate it on data shaped like its training data (e.g. data.options.image_size)")
        raise ValueError(f"{shown}: its tensors do not fit the model its config describes: {details}")
    del probe
    model = build_model(spec, inputs, independent=independent, allow_import=allow_import)
    model.load_state_dict(state)
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{shown}: the model's {name} holds NaN or infinite values; it cannot be evaluated")
    model.model_inputs = None if legacy else (inputs if isinstance(inputs, dict) else input_spec(inputs))
    return model


def load_model(path: str | Path, device: torch.device | None = None, allow_import: bool = False, inputs=None):
    """(model, config) from ``model.safetensors`` (exported) or ``checkpoint.pt``. A file written
    before input specs were stored is sized from ``inputs`` (a dataset or an input spec) or, for a
    built-in dataset, from its training split under the stored (plain) options; a CSV or folder
    dataset is never read from a path inside the file."""
    from plait.data.registry import ALIASES, PATH_ARGUMENT

    state, config, spec = read_saved(path, allow_import)
    legacy = spec is None
    if legacy and inputs is None:
        name = ALIASES.get(config.data.name.lower(), config.data.name.lower())
        if name in PATH_ARGUMENT:
            raise ValueError(f"{display_path(path)} has no input spec and was trained on {name} data, which is never read from "
                             "a path inside a file: evaluate it with plait eval ... data.options.path=YOUR_DATA")
        from plait.data import build_dataset

        options, _ = stored_data_options(config, display_path(path))
        inputs = build_dataset(config.data.name, split="train", **options)
    model = build_saved_model(path, state, config, spec if spec is not None else inputs, allow_import, legacy=legacy)
    return model.to(device or "cpu"), config


def evaluation_config(config: DictConfig, data: str | None, overrides: list[str] | tuple[str, ...],
                      source: str = "the saved model") -> DictConfig:
    """The stored config with another dataset (options reset) or its own data options without the
    file names and directories inside it, the command-line overrides merged over it, and
    ``train.device`` from the command line only (default auto). Overrides of the model or of how it
    was trained are refused; a CSV or folder dataset needs its path on the command line."""
    from plait.config import load_config
    from plait.data.registry import ALIASES, PATH_ARGUMENT

    # overrides are checked as load_config checks them, then merged over the stored config
    load_config(None, list(overrides))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not any(key == allowed or key.startswith(allowed + ".") for allowed in EVAL_KEYS):
            what = "the model is defined by the file" if key.split(".")[0] == "model" else "it does not change an evaluation"
            raise ValueError(f"{item!r}: plait eval cannot change {key} ({what}); it takes overrides of data.*, eval.*, "
                             "train.device and name")
    config = copy.deepcopy(config)  # the stored config itself stays as read
    dropped = {}
    if data is not None and data != config.data.name:
        config.data.name = data
        config.data.options = {}
    else:
        options, dropped = stored_data_options(config, source)
        config.data.options = options
    config.train.device = "auto"  # where the run trained is not where it is evaluated
    for item in overrides:
        config = OmegaConf.merge(config, OmegaConf.from_dotlist([item]))
    from plait.config import validate_eval

    validate_eval(config)
    options = config.data.options
    name = ALIASES.get(str(config.data.name).lower(), str(config.data.name).lower())
    if name in PATH_ARGUMENT:
        for key in ("path", "test_path"):
            stored = dropped.get(key) if key != "path" else dropped.get("path", dropped.get("folder"))
            if stored is not None and key not in options and not (key == "test_path" and options.get("test_fraction")):
                raise ValueError(f"{source}: the file's config names {'data' if key == 'path' else 'a test table'} at "
                                 f"{str(stored)[:200]!r}, and file names inside a saved model are never followed; "
                                 f"pass data.options.{key}=... to evaluate on it")
        if "path" not in options:
            raise ValueError(f"{source}: {name} data need data.options.path=... on the command line")
    return config


def _show_view(spec: dict, k: int) -> str:
    shape = spec["shapes"][k]
    return spec["modalities"][k] + ("" if shape is None else " of shape " + "x".join(map(str, shape)))


def check_data_fits(model, dataset, path: str | Path) -> None:
    """The evaluation data give the views the model was trained on (modality and shape)."""
    from plait.models import input_spec

    wanted = getattr(model, "model_inputs", None)
    if wanted is None:
        return
    given = input_spec(dataset)
    for side, k in (("a", 0), ("b", 1)):
        if wanted["modalities"][k] != given["modalities"][k] or wanted["shapes"][k] != given["shapes"][k]:
            hint = ("; set data.options.image_size to match" if wanted["modalities"][k] == "image" == given["modalities"][k]
                    else "")
            raise ValueError(f"{display_path(path)}: tower {side} takes {_show_view(wanted, k)}, the evaluation data give "
                             f"{_show_view(given, k)}{hint}")


def _check_out_dir(out_dir, create: bool = True) -> None:
    """``--out``: a directory, created (``create``) if missing; a file there (or no permission) is one line."""
    if out_dir is None:
        return
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {display_path(out)} is a file, not a directory")
    if not create:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the --out directory {display_path(out)}: {error.strerror or error}") from None


def evaluate_saved(path: str | Path, data: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                   out_dir: str | Path | None = None, allow_import: bool = False) -> dict:
    """Evaluate saved weights on the test split (``eval.split``: or the validation split) of the
    run's dataset (or of ``data`` / overrides). Writes eval.json and gallery.npz into ``out_dir`` if given."""
    from plait.data import build_dataset
    from plait.evaluate.suite import evaluate_model

    shown = display_path(path)
    _check_out_dir(out_dir, create=False)
    state, stored, spec = read_saved(path, allow_import=allow_import)
    config = evaluation_config(stored, data, overrides, source=shown)
    device = runtime.select_device(config.train.device)
    model = build_saved_model(path, state, stored, spec, allow_import) if spec is not None else None
    options = OmegaConf.to_container(config.data.options, resolve=True) or {}  # only the command line's own ${...}
    train_set = build_dataset(config.data.name, split="train", **dict(options))
    if config.eval.split == "validation":
        from plait.data import carve_validation

        train_set, test_set = carve_validation(train_set, config.data.validation_fraction, seed=0)  # as the trainer carves it
    else:
        test_set = build_dataset(config.data.name, split="test", **dict(options))
    if len(test_set) == 0:
        raise ValueError(f"dataset {config.data.name!r} has no test split to evaluate; "
                         "set data.options.test_fraction or data.options.test_path (or eval.split=validation)")
    if model is None:  # no input spec in the file: the evaluation data size the towers, the file's tensors must fit them
        model = build_saved_model(path, state, stored, train_set, allow_import, legacy=True)
    check_data_fits(model, test_set, path)
    model = model.to(device)
    _check_out_dir(out_dir)
    return evaluate_model(model, train_set, test_set, config.eval, device, run_dir=out_dir,
                          info={"name": config.name, "dataset": config.data.name, "weights": str(path),
                                "split": config.eval.split})
