"""``plait eval`` and ``load_model``: saved models are data, whatever a file holds.

Every route by which a file reaches plait is tried with a crafted file: the config in the
safetensors metadata, the config in a checkpoint, the pickle of a checkpoint, the safetensors
header. Nothing may execute (a marker file proves it), nothing of the environment may be read,
and each is refused with one line naming the file.
"""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from plait.checkpoint import load_checkpoint, load_weights, save_checkpoint
from plait.cli import main
from plait.config import load_config, load_stored_config, to_yaml
from plait.evaluate.run import evaluate_saved, load_model
from plait.models import build_model, input_spec
from plait.training import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained tiny run (digits, 6 steps): its directory."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    train(load_config("tiny", [f"output_dir={run}", "train.staleness_every_epochs=0"]))
    return run


def _crafted(tmp_path, tiny_run, change, name="crafted.safetensors"):
    """The tiny run's exported weights with ``change(config_dict)`` applied to the stored config."""
    import yaml

    state, config_yaml, inputs = load_weights(tiny_run / "model.safetensors", with_inputs=True)
    config = yaml.safe_load(config_yaml)
    change(config)
    from safetensors.torch import save

    metadata = {"format": "plait-weights-1", "config": yaml.safe_dump(config), "inputs": json.dumps(inputs)}
    path = tmp_path / name
    path.write_bytes(save(state, metadata=metadata))
    return path


def _eval_cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["eval", *map(str, args)])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("plait: error: "), err
    return lines[0]


def test_an_import_path_in_the_stored_config_never_runs(tmp_path, tiny_run, capsys):
    marker = tmp_path / "pwned"

    def evil(config):
        config["model"]["a"] = {"name": "os:system", "command": f"touch {marker}"}

    for path in (_crafted(tmp_path, tiny_run, evil),):
        code, err = _eval_cli(capsys, path, "--out", tmp_path / "out")
        assert code == 2
        assert "model.a.name='os:system' is an import path" in _one_line(err) and str(path) in err
        assert not marker.exists() and not (tmp_path / "out" / "eval.json").exists()
    # the same through a checkpoint's config field
    checkpoint = load_checkpoint(tiny_run / "checkpoint.pt")
    import yaml

    config = yaml.safe_load(checkpoint["config"])
    evil(config)
    checkpoint["config"] = yaml.safe_dump(config)
    crafted = tmp_path / "crafted.pt"
    save_checkpoint(crafted, {k: v for k, v in checkpoint.items() if k != "format"})
    code, err = _eval_cli(capsys, crafted)
    assert code == 2 and "is an import path" in _one_line(err)
    assert not marker.exists()


def test_interpolations_in_a_stored_config_are_refused_not_resolved(tmp_path, tiny_run, capsys):
    def leak(config):
        config["name"] = "${oc.env:HOME}"

    path = _crafted(tmp_path, tiny_run, leak)
    code, err = _eval_cli(capsys, path, "--out", tmp_path / "out")
    assert code == 2 and "is an interpolation" in _one_line(err)
    assert os.environ.get("HOME", "/nonexistent-home") not in err
    assert not (tmp_path / "out").exists()
    for value in ("${oc.decode:'[1]'}", "x ${name} y", "${oc.create:{a: 1}}"):
        with pytest.raises(ValueError, match="is an interpolation"):
            load_stored_config(f"name: \"{value}\"\n", source="f.yaml")


@pytest.mark.parametrize("text, message", [
    ("data: {name: emoji\n", "not valid YAML"),
    ("- a\n- b\n", "not a mapping"),
    ("optim: {lr: fast}\n", "does not fit the schema"),
    ("optim: {epochz: 3}\n", "does not fit the schema"),
    ("data: {name: 'plait.data:Anything'}\n", "data.name='plait.data:Anything' is not a registered name"),
    ("loss: {name: mystery}\n", "loss.name='mystery' is not a registered name"),
    ("regularizers: [{name: evil}]\n", "regularizers[0].name='evil' is not a registered name"),
    ("model: {b: {name: builtins:eval}}\n", "is an import path"),
    ("model: {b: {name: resnet}}\n", "model.b.name='resnet' is not a registered name"),
    ("!!python/object/apply:os.system ['touch x']\n", "not valid YAML"),
])
def test_stored_configs_are_validated_against_the_schema_and_the_registries(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")) as caught:
        load_stored_config(text, source="model.safetensors")
    assert str(caught.value).startswith("model.safetensors: ") and "\n" not in str(caught.value)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_naming_any_global_is_refused_unread(tmp_path, capsys, protocol):
    """One line, no torch warning before it, and never torch's advice to load with
    weights_only=False (which would run the file's code)."""
    import warnings

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "plait-checkpoint-1", "model": Exploit(), "config": ""}, handle, protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = _eval_cli(capsys, path)
    assert code == 2 and caught == []
    line = _one_line(err)
    assert "not a loadable plait checkpoint" in line and "weights_only" not in line and "will likely succeed" not in line
    if protocol == 2:  # the global is reached and named
        assert "its pickle names the global posix.system" in line and "refused without running it" in line
    else:  # protocol 4 and 5 frame the pickle: the weights-only loader refuses the opcode before any global
        assert "its pickle uses opcode 149 (FRAME), which the weights-only loader refuses (nothing was run" in line
    assert not marker.exists()
    # torch.save'd objects other than tensors and plain data: refused as well
    torch.save({"format": "plait-checkpoint-1", "model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match="names the global torch.nn.modules.linear.Linear, which is not a tensor") as refused:
        load_checkpoint(path)
    assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)


def test_random_bytes_as_a_checkpoint_are_one_line_without_unsafe_advice(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "checkpoint.pt"
    for n, prefix in enumerate([b"", b"", b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x02}q\x00("]):
        path.write_bytes(prefix + rng.integers(0, 256, 200 + 50 * n, dtype=np.uint8).tobytes())
        code, err = _eval_cli(capsys, path)
        line = _one_line(err)
        assert code == 2 and "weights_only" not in line and "not a loadable plait checkpoint: " in line, line
        assert not line.rstrip().endswith(": 101") and "nothing was run" in line or "zip archive" in line, line


def _header(blob: dict) -> bytes:
    data = json.dumps(blob).encode()
    return len(data).to_bytes(8, "little") + data


@pytest.mark.parametrize("content, message", [
    (b"", "not a safetensors file (only 0 bytes)"),
    (b"\x10\x00", "not a safetensors file (only 2 bytes)"),
    ((10**12).to_bytes(8, "little") + b"{}", "is truncated"),
    ((5).to_bytes(8, "little") + b"\xff\xfe{}]", "malformed safetensors header (not JSON)"),
    (_header(["a"]), "not an object"),
    (_header({"__metadata__": {"config": 3}}), "malformed safetensors metadata"),
    (_header({"__metadata__": {"format": "x"}}), "no plait config in its metadata"),
    (_header({"__metadata__": {"config": "name: x"}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
     "not a readable safetensors file: Error while deserializing"),
])
def test_malformed_safetensors_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    code, err = _eval_cli(capsys, path)
    assert code == 2 and message in _one_line(err) and str(path) in err


def test_truncated_real_files_are_refused(tmp_path, tiny_run, capsys):
    for name in ("model.safetensors", "checkpoint.pt"):
        data = (tiny_run / name).read_bytes()
        for cut in (len(data) // 3, len(data) - 7):
            path = tmp_path / f"cut-{cut}-{name}"
            path.write_bytes(data[:cut])
            code, err = _eval_cli(capsys, path)
            assert code == 2 and str(path) in _one_line(err)


def test_tensors_that_do_not_fit_the_stored_config_are_named(tmp_path, tiny_run):
    state, config_yaml, inputs = load_weights(tiny_run / "model.safetensors", with_inputs=True)
    from safetensors.torch import save

    state = dict(state)
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    path = tmp_path / "w.safetensors"
    path.write_bytes(save(state, metadata={"config": config_yaml, "inputs": json.dumps(inputs)}))
    with pytest.raises(ValueError, match=f"{name} has shape \\(3, 3\\)"):
        load_model(path)
    path.write_bytes(save(state, metadata={"config": config_yaml, "inputs": json.dumps({"modalities": ["image"], "shapes": 1})}))
    with pytest.raises(ValueError, match="malformed input spec"):
        load_model(path)


def test_a_saved_model_is_rebuilt_without_its_training_data(tmp_path, tiny_run):
    """The stored input spec sizes the towers: a model loads with its dataset gone, and equals
    the trained one tensor for tensor."""
    config = load_config("tiny", [f"output_dir={tmp_path}"])
    from plait.data import build_dataset

    dataset = build_dataset("digits", split="train", image_size=8)
    assert input_spec(dataset) == {"modalities": ["image", "text"], "shapes": [[3, 8, 8], None]}
    from omegaconf import OmegaConf

    from_data = build_model(OmegaConf.to_container(config.model), dataset)
    from_spec = build_model(OmegaConf.to_container(config.model), input_spec(dataset))
    assert {k: v.shape for k, v in from_data.state_dict().items()} == {k: v.shape for k, v in from_spec.state_dict().items()}
    model, stored = load_model(tiny_run / "model.safetensors")
    trained = load_checkpoint(tiny_run / "checkpoint.pt")["model"]
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    assert stored.data.name == "digits"


def _write_csv(folder, n=24, size=8, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    lines = ["image,text"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,item number {i} in colour {['red', 'blue', 'green'][i % 3]}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def test_eval_can_point_at_another_dataset_or_the_same_csv_moved(tmp_path, capsys):
    csv = _write_csv(tmp_path / "data")
    run = tmp_path / "run"
    train(load_config("tiny", [f"output_dir={run}", "data.name=csv", f"data.options.path={csv}",
                               "data.options.test_fraction=0.25", "data.options.cache_dir=false", "data.batch_size=8",
                               "eval.tasks=[retrieval]", "train.staleness_every_epochs=0"]))
    trained = json.loads((run / "eval.json").read_text())["metrics"]
    moved = tmp_path / "elsewhere"
    shutil.move(str(csv.parent), moved)  # the training CSV is gone from where the run saw it
    again = evaluate_saved(run / "model.safetensors", overrides=[f"data.options.path={moved / 'pairs.csv'}"])
    assert again == trained
    # another dataset: its options start empty (the CSV's path and test_fraction are not carried over)
    other = evaluate_saved(run / "model.safetensors", data="digits", overrides=["data.options.image_size=8"])
    assert 0.0 <= other["image_retrieval_recall@1"] <= 1.0
    # images of another size than the towers take: one clear line, not a shape traceback
    code, err = _eval_cli(capsys, run / "model.safetensors", "--data", "digits", "data.options.image_size=16")
    assert code == 2 and "tower a takes image of shape 3x8x8, the evaluation data give image of shape 3x16x16" in _one_line(err)
    code, err = _eval_cli(capsys, run / "model.safetensors", "eval.tasks=[retreival]")
    assert code == 2 and "eval.tasks has unknown task(s) 'retreival'" in _one_line(err)


def test_allow_import_is_a_command_line_opt_in(tmp_path, capsys):
    """A plug-in encoder trains and evaluates with --allow-import, and is refused without it."""
    run = tmp_path / "run"
    config = tmp_path / "plugin.yaml"
    import yaml

    spec = yaml.safe_load(to_yaml(load_config("tiny")))
    spec["model"]["a"] = {"name": "tests.models.test_models:TinyEncoder", "out_dim": 8}
    config.write_text(yaml.safe_dump(spec))
    args = ["train", str(config), f"output_dir={run}", "train.staleness_every_epochs=0"]
    code = main(args)
    assert code == 2 and "needs --allow-import" in capsys.readouterr().err
    assert not (run / "checkpoint.pt").exists()
    assert main([*args, "--allow-import"]) == 0
    code, err = _eval_cli(capsys, run / "model.safetensors")
    assert code == 2 and "is an import path" in _one_line(err)
    assert main(["eval", str(run / "model.safetensors"), "--allow-import"]) == 0
    # resuming reads the checkpoint's config: the same opt-in, from the command line only
    assert main([*args, "--resume", "optim.max_steps=8"]) == 2
    assert "is an import path" in capsys.readouterr().err
    assert main([*args, "--resume", "--allow-import", "optim.max_steps=8"]) == 0


# ------------------------------------------------------------------------------ review: paths, sizes, legacy files, messages
def test_paths_inside_a_saved_file_are_never_followed(tmp_path, tiny_run, capsys, monkeypatch):
    """A crafted file naming data at /etc/passwd, a cache directory or ~ reads and writes nothing
    there: a CSV or folder dataset needs data.options.path on the command line, a stored cache_dir
    is dropped (the default cache is used), and built-in datasets keep their plain stored options."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the first line\n")

    def csv_at(path, **more):
        def change(config):
            config["data"]["name"] = "csv"
            config["data"]["options"] = {"path": str(path), **more}
        return change

    for name, change, shown in (("abs", csv_at(secret), str(secret)), ("home", csv_at("~/pairs.csv"), "~/pairs.csv"),
                                ("folder", lambda c: c["data"].update(name="folder", options={"path": str(tmp_path)}),
                                 str(tmp_path))):
        path = _crafted(tmp_path, tiny_run, change, name=f"{name}.safetensors")
        code, err = _eval_cli(capsys, path, "--out", tmp_path / "out")
        assert code == 2 and "the first line" not in err and "root:x" not in err
        assert _one_line(err) == (f"plait: error: {path}: the file's config names data at {shown!r}, and file names inside a "
                                  "saved model are never followed; pass data.options.path=... to evaluate on it")
        assert not (tmp_path / "out").exists()
    path = _crafted(tmp_path, tiny_run, csv_at(secret, test_path=str(secret)), name="test.safetensors")
    code, err = _eval_cli(capsys, path, f"data.options.path={secret}")
    assert code == 2 and "names a test table at" in _one_line(err) and "pass data.options.test_path=..." in err
    # a stored cache directory is never written: the default cache is
    evil_cache, cache = tmp_path / "evilcache", tmp_path / "cache"
    monkeypatch.setenv("PLAIT_CACHE", str(cache))
    from plait.evaluate.run import evaluation_config, read_saved

    path = _crafted(tmp_path, tiny_run,
                    lambda c: c["data"].update(name="emoji", options={"cache_dir": str(evil_cache), "image_size": 8}),
                    name="cache.safetensors")
    _, stored, _ = read_saved(path)
    config = evaluation_config(stored, None, ["eval.tasks=[retrieval]"])
    assert dict(config.data.options) == {"image_size": 8} and not evil_cache.exists()
    path = _crafted(tmp_path, tiny_run, lambda c: c["data"]["options"].update(cache_dir=False), name="memory.safetensors")
    assert dict(evaluation_config(read_saved(path)[1], None, []).data.options) == {"image_size": 8, "cache_dir": False}
    # stored options must be plain values
    path = _crafted(tmp_path, tiny_run, lambda c: c["data"]["options"].update(image_size={"nested": [1]}),
                    name="nested.safetensors")
    code, err = _eval_cli(capsys, path)
    assert code == 2 and "stored data option 'image_size' is not a plain value" in _one_line(err)
    # a built-in dataset evaluates with its stored options, as before
    assert evaluate_saved(tiny_run / "model.safetensors", overrides=["eval.tasks=[retrieval]"]) == \
        {k: v for k, v in json.loads((tiny_run / "eval.json").read_text())["metrics"].items() if "retrieval" in k}


def test_crafted_sizes_allocate_nothing_and_are_one_line(tmp_path, tiny_run, capsys):
    """The model is sized on the meta device and compared with the file's tensors before it exists:
    sizes in a crafted config or input spec never allocate (a 4 TB tower: no time, no memory)."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    cases = [
        (lambda c: c["model"]["a"].update(hidden=[1 << 20, 1 << 20]), None,
         "its tensors do not fit the model its config describes"),
        (lambda c: c["model"].update(embed_dim=-5), None, "model.embed_dim=-5 is not valid"),
        (lambda c: c["model"]["a"].update(hidden=[-1]), None, "model.a.hidden[0]=-1 is not valid"),
        (lambda c: c["model"].update(projection_hidden=-1), None, "model.projection_hidden=-1 is not valid"),
        (lambda c: None, {"modalities": ["vector", "text"], "shapes": [[1 << 12, 1 << 12, 1 << 12], None]},
         "malformed input spec"),
        (lambda c: None, {"modalities": ["vector", "text"], "shapes": [[1 << 20, 4096], None]}, "malformed input spec"),
        (lambda c: None, {"modalities": ["vector", "text"], "shapes": [[4096, 4096], None]}, "its tensors do not fit"),
    ]
    for n, (change, inputs, message) in enumerate(cases):
        path = _crafted(tmp_path, tiny_run, change, name=f"size{n}.safetensors")
        if inputs is not None:
            from safetensors.torch import save

            state, config_yaml = load_weights(path)
            path.write_bytes(save(state, metadata={"format": "plait-weights-1", "config": config_yaml,
                                                   "inputs": json.dumps(inputs)}))
        code, err = _eval_cli(capsys, path)
        assert code == 2 and message in _one_line(err) and str(path) in err, (n, err)
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: no tower of 2^40 numbers


def _legacy(tmp_path, run, name="legacy.safetensors"):
    """A run's exported weights without the input spec (as every file written before it was stored)."""
    from safetensors.torch import save

    state, config_yaml = load_weights(run / "model.safetensors")
    path = tmp_path / name
    path.write_bytes(save(state, metadata={"format": "plait-weights-1", "config": config_yaml}))
    return path


def test_a_file_without_an_input_spec_is_sized_from_the_evaluation_data_and_still_checked(tmp_path, tiny_run, capsys):
    legacy = _legacy(tmp_path, tiny_run)
    metrics = json.loads((tiny_run / "eval.json").read_text())["metrics"]
    assert evaluate_saved(legacy) == metrics
    code, err = _eval_cli(capsys, legacy, "data.options.image_size=16")
    line = _one_line(err)
    assert code == 2 and ("this file has no input spec, so its towers were sized from the evaluation data "
                          "(image of shape 3x16x16; text)") in line
    assert "encoder_a.net.1.weight has shape (64, 192), the model (64, 768)" in line and "data.options.image_size" in line
    # a CSV run's legacy file evaluates on the moved CSV (the data are built after the overrides)
    csv = _write_csv(tmp_path / "data")
    run = tmp_path / "csvrun"
    train(load_config("tiny", [f"output_dir={run}", "data.name=csv", f"data.options.path={csv}",
                               "data.options.test_fraction=0.25", "data.batch_size=8", "eval.tasks=[retrieval]",
                               "train.staleness_every_epochs=0"]))
    moved = tmp_path / "moved"
    shutil.move(str(csv.parent), moved)
    old = _legacy(tmp_path, run, "csv-legacy.safetensors")
    assert evaluate_saved(old, overrides=[f"data.options.path={moved / 'pairs.csv'}"]) == \
        json.loads((run / "eval.json").read_text())["metrics"]
    with pytest.raises(ValueError, match="has no input spec and was trained on csv data"):
        load_model(old)
    from plait.data import build_dataset

    model, _ = load_model(old, inputs=build_dataset("csv", path=str(moved / "pairs.csv"), image_size=8, test_fraction=0.25))
    assert model.encoder_a.net[1].weight.shape == (64, 192)


def test_eval_messages_device_model_overrides_split_nan_and_file_names(tmp_path, tiny_run, capsys):
    # a run trained on cuda evaluates here (the device is the command line's, default auto)
    cuda = _crafted(tmp_path, tiny_run, lambda c: c["train"].update(device="cuda"), name="cuda.safetensors")
    assert evaluate_saved(cuda, overrides=["eval.tasks=[retrieval]"])["image_retrieval_recall@1"] >= 0
    # the model is the file's: model.* (and how it was trained) cannot be overridden
    for item, what in (("model.embed_dim=64", "the model is defined by the file"),
                       ("optim.lr=0.1", "it does not change an evaluation"),
                       ("loss.name=infonce", "it does not change an evaluation")):
        code, err = _eval_cli(capsys, tiny_run / "model.safetensors", item)
        key = item.split("=")[0]
        assert code == 2 and f"{item!r}: plait eval cannot change {key} ({what})" in _one_line(err)
    # eval.split=validation is honoured: the validation split carved as the trainer carves it
    code, err = _eval_cli(capsys, tiny_run / "model.safetensors", "eval.split=validation")
    assert code == 2 and "eval.split=validation needs data.validation_fraction > 0" in _one_line(err)
    on_validation = evaluate_saved(tiny_run / "model.safetensors",
                                   overrides=["eval.split=validation", "data.validation_fraction=0.2", "eval.tasks=[retrieval]"],
                                   out_dir=tmp_path / "v")
    assert json.loads((tmp_path / "v" / "eval.json").read_text())["split"] == "validation"
    assert on_validation != evaluate_saved(tiny_run / "model.safetensors", overrides=["eval.tasks=[retrieval]"])
    # NaN weights: the file is named
    state, config_yaml, inputs = load_weights(tiny_run / "model.safetensors", with_inputs=True)
    from safetensors.torch import save

    state = dict(state)
    state["encoder_a.net.1.weight"] = torch.full_like(state["encoder_a.net.1.weight"], float("nan"))
    odd = tmp_path / "odd\nname.safetensors"
    odd.write_bytes(save(state, metadata={"format": "plait-weights-1", "config": config_yaml, "inputs": json.dumps(inputs)}))
    code, err = _eval_cli(capsys, odd)
    shown = repr(str(odd))[1:-1]  # the newline escaped: one line
    assert "\\n" in shown and code == 2
    assert _one_line(err) == (f"plait: error: {shown}: the model's encoder_a.net.1.weight holds NaN or infinite values; "
                              "it cannot be evaluated")
    code, err = _eval_cli(capsys, tmp_path / "gone\nfile.pt")
    assert code == 2 and "gone\\nfile.pt does not exist" in _one_line(err)
