"""The trainer end to end on the tiny config: CLI, resume, checkpoints, export."""

import json
import math
import pickle

import pytest
import torch

from plait.checkpoint import load_checkpoint, load_weights, save_checkpoint
from plait.cli import main
from plait.config import load_config
from plait.data.sampler import EpochSampler
from plait.optim import warmup_cosine
from plait.training import Trainer


def _config(tmp_path, *overrides):
    return load_config("tiny", [f"output_dir={tmp_path}", *overrides])


def test_cli_trains_and_evaluates_tiny_config_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "tiny", f"output_dir={run}", "loss.name=gamma"]) == 0
    for name in ("checkpoint.pt", "model.safetensors", "config.yaml", "metrics.jsonl", "eval.json", "report.md", "loss.png",
                 "gallery.png"):
        assert (run / name).stat().st_size > 0, name
    trained = json.loads((run / "eval.json").read_text())["metrics"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 for r in records if "loss" in r)
    # plait eval on the exported weights reproduces the end-of-training metrics exactly
    capsys.readouterr()
    assert main(["eval", str(run / "model.safetensors"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "eval.json").read_text())["metrics"]
    assert again == trained
    assert 0.0 <= trained["lp_acc1"] <= 1.0 and "zeroshot_acc1" in trained and "image_retrieval_recall@1" in trained


def test_bad_config_is_reported_with_the_key(tmp_path, capsys):
    assert main(["train", "tiny", f"output_dir={tmp_path}", "data.batchsize=3"]) == 2
    assert "batchsize" in capsys.readouterr().err
    assert main(["train", "nonexistent.yaml"]) == 2
    assert "nonexistent.yaml does not exist" in capsys.readouterr().err


def _straight_and_resumed(tmp_path, common, stop: int, total: int) -> tuple[Trainer, Trainer]:
    """``total`` steps in one go, and ``stop`` steps, a checkpoint, then a resumed trainer to ``total``."""
    straight = Trainer(_config(tmp_path / "a", *common, f"optim.max_steps={total}"))
    straight.train_until(total)
    first = Trainer(_config(tmp_path / "b", *common, f"optim.max_steps={stop}"))
    first.train_until(stop)
    first.save()
    resumed = Trainer(_config(tmp_path / "b", *common, f"optim.max_steps={total}"))
    resumed.resume()
    assert resumed.step == stop
    resumed.train_until(total)
    return straight, resumed


@pytest.mark.parametrize("loss", ["gamma", "infonce", "sogclr"])
def test_resume_after_k_steps_is_bitwise_identical(tmp_path, loss):
    """Stop after 3 steps (checkpoint), resume to 7: the same parameters, bit for bit, as 7 steps
    in one go (CPU, deterministic mode); loss state, optimiser, schedule, RNG and data order all
    come back from the checkpoint."""
    common = [f"loss.name={loss}", "train.deterministic=true", "optim.epochs=2", "data.batch_size=256",
              "data.augment.image=true", "data.augment.text=true", "eval.tasks=[retrieval]"]
    straight, resumed = _straight_and_resumed(tmp_path, common, stop=3, total=7)
    for (name, x), y in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(x, y), name
    for (name, x), y in zip(straight.loss_fn.state_dict().items(), resumed.loss_fn.state_dict().values()):
        assert torch.equal(x, y), name
    assert straight.steps_per_epoch < 7  # the run crossed an epoch boundary after resuming


def test_interrupted_checkpoint_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_config(tmp_path, "optim.max_steps=2"))
    trainer.train_until(2)
    trainer.save()
    before = load_checkpoint(tmp_path / "checkpoint.pt")
    trainer.train_until(4) if trainer.total_steps >= 4 else None

    real_save = torch.save

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(torch, "save", real_save)
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["progress"] == before["progress"]
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "plait-checkpoint-1", "model": Exploit()}, handle)
    with pytest.raises(ValueError, match="not a loadable plait checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    save_checkpoint(tmp_path / "other.pt", {"format": "x"})
    with pytest.raises(ValueError, match="not a plait checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no plait config"):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        load_weights(tmp_path / "w.safetensors")


def test_the_torch_floor_is_one_whose_weights_only_loader_is_safe():
    """torch.load(weights_only=True) ran code before 2.6 (CVE-2025-32434) and its unpickler could
    corrupt memory before 2.10 (CVE-2026-24747): loading a checkpoint is data only from 2.10 on."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    floor = re.findall(r'^\s*"torch([^"]*)",', text, flags=re.M)
    assert len(floor) == 1 and re.fullmatch(r">=(\d+)\.(\d+)(\.\d+)?", floor[0]), floor
    assert tuple(int(x) for x in re.match(r">=(\d+)\.(\d+)", floor[0]).groups()) >= (2, 10)
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= (2, 10) and hasattr(torch.nn.utils, "get_total_norm")


def test_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=3)
    sampler.set_position(2, 0)
    full = list(sampler)
    sampler.set_position(2, 4)
    assert list(sampler) == full[4:]
    sampler.set_position(3, 0)
    assert list(sampler) != full and sorted(full) == list(range(10))


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [round(factor(s), 6) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_user_csv_data_with_a_bad_row_trains_and_lists_the_skip(tmp_path):
    from PIL import Image

    images = tmp_path / "data"
    images.mkdir()
    rows = ["picture,caption"]
    for i in range(24):
        Image.new("RGB", (10, 10), color=(10 * i, 255 - 10 * i, 128)).save(images / f"{i}.png")
        rows.append(f"data/{i}.png,colour swatch number {i}")
    rows.append("data/missing.png,a row whose image is gone")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main(["train", "tiny", f"output_dir={run}", "data.name=csv", f"data.options.path={tmp_path / 'pairs.csv'}",
                 "data.options.image_column=picture", "data.options.text_column=caption", "data.options.image_size=8",
                 "data.options.bad_rows=skip", "data.options.test_fraction=0.25", "data.batch_size=6",
                 "eval.tasks=[retrieval]", "train.tensorboard=true"]) == 0
    skipped = json.loads((run / "skipped_rows.json").read_text())
    assert skipped["count"] == 1 and "missing.png" in skipped["skipped"][0]["reason"] and skipped["skipped"][0]["row"] == 25
    assert "image_retrieval_recall@1" in json.loads((run / "eval.json").read_text())["metrics"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the default policy stops at the bad row and names it
    assert main(["train", "tiny", f"output_dir={tmp_path / 'strict'}", "data.name=csv",
                 f"data.options.path={tmp_path / 'pairs.csv'}", "data.options.image_column=picture",
                 "data.options.text_column=caption"]) == 2


@pytest.mark.parametrize("regularizers", [
    "[{name: separation, weight: 0.1}]", "[{name: bridge, weight: 0.1, t: 0.25}]",
    "[{name: consistency, weight: 0.5}]",
    "[{name: sep, weight: 0.1}, {name: br, weight: 0.1, t: uniform}, {name: gc, weight: 0.5}]",
])
def test_each_regularizer_with_the_gamma_loss_trains_end_to_end(tmp_path, regularizers):
    run = tmp_path / "run"
    features = "both" if "sep" in regularizers else "shared"
    assert main(["train", "tiny", f"output_dir={run}", "loss.name=gamma", "loss.in_modal=true",
                 f"regularizers={regularizers}", f"eval.features={features}", "eval.tasks=[retrieval,linear_probe]"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r and r.get("split") != "eval"]
    names = [spec.split(",")[0].split(": ")[1] for spec in regularizers.strip("[]").split("}, {")]
    for name in names:
        full = {"sep": "separation", "br": "bridge", "gc": "consistency"}.get(name, name)
        assert all(full in r and r[full] == r[full] for r in train_records), full  # logged, not NaN
    assert all(math.isfinite(r["in_modal_a"]) and math.isfinite(r["in_modal_b"]) and r["state_age"] >= 0 for r in train_records)
    assert 0 <= json.loads((run / "eval.json").read_text())["metrics"]["lp_acc1"] <= 1


def test_momentum_encoder_is_an_ema_of_the_model_and_writes_the_bank(tmp_path):
    """theta_m <- m theta_m + (1 - m) theta after each step, and the bank rows of a batch are that batch's
    features through the momentum encoder as it was before the step (not the online features)."""
    import copy

    trainer = Trainer(_config(tmp_path, "loss.options.estimator=memory", "train.bank_momentum=0.5", "optim.max_steps=4"))
    bank_loss = trainer.loss_fn.base
    for step, (index, a, b) in zip(range(3), trainer.loader):
        before = copy.deepcopy(trainer.momentum_model)
        trainer.train_step(index, a, b)
        with torch.no_grad():
            za, zb, _ = before(a, list(b))
        torch.testing.assert_close(bank_loss.bank[0, index], torch.nn.functional.normalize(za, dim=1), atol=1e-6, rtol=0)
        torch.testing.assert_close(bank_loss.bank[1, index], torch.nn.functional.normalize(zb, dim=1), atol=1e-6, rtol=0)
        online = dict(trainer.model.named_parameters())
        for name, slow in trainer.momentum_model.named_parameters():
            expected = 0.5 * dict(before.named_parameters())[name] + 0.5 * online[name].detach()
            torch.testing.assert_close(slow, expected, atol=1e-7, rtol=0)
        if step > 0:  # the online model has moved away from the momentum copy
            assert not torch.allclose(bank_loss.bank[0, index], trainer.model.encode_a(a).detach())


def test_momentum_encoder_resumes_bitwise_and_needs_a_memory_bank(tmp_path):
    common = ["loss.options.estimator=memory", "train.bank_momentum=0.9", "train.deterministic=true", "optim.epochs=2",
              "data.batch_size=256", "eval.tasks=[retrieval]"]
    straight, resumed = _straight_and_resumed(tmp_path, common, stop=2, total=6)
    for x, y in zip(straight.momentum_model.state_dict().values(), resumed.momentum_model.state_dict().values()):
        assert torch.equal(x, y)
    assert torch.equal(straight.loss_fn.base.bank, resumed.loss_fn.base.bank)
    with pytest.raises(ValueError, match="bank_momentum needs the gamma loss with a memory bank"):
        Trainer(_config(tmp_path / "c", "loss.options.estimator=ema", "train.bank_momentum=0.9"))
    with pytest.raises(ValueError, match="bank_momentum must be in"):
        Trainer(_config(tmp_path / "d", "loss.options.estimator=memory", "train.bank_momentum=1.5"))


def test_validation_split_step_budget_staleness_records_and_exact_from_a_config(tmp_path):
    """data.validation_fraction carves a validation split that evaluations during training read; optim.steps is
    the schedule's length over as many epochs as it takes; the gamma loss logs its staleness once per epoch;
    estimator=exact gets every item's features from the trainer before each step."""
    trainer = Trainer(_config(tmp_path, "data.validation_fraction=0.2", "optim.steps=13", "optim.max_steps=null",
                              "data.batch_size=256", "train.eval_every_epochs=1", "eval.tasks=[retrieval]",
                              "loss.options.estimator=exact"))
    full = len(trainer.test_set)  # the test split is untouched
    assert len(trainer.train_set) + len(trainer.validation_set) == len(Trainer(_config(tmp_path / "x")).train_set)
    assert trainer.total_steps == 13 and trainer.steps_per_epoch < 13
    metrics = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = trainer.epoch
    assert [r["epoch"] for r in records if r.get("split") == "staleness"] == list(range(1, epochs + 1))
    validation = [r for r in records if r.get("split") == "validation"]
    assert len(validation) >= 2 and all("text_retrieval_recall@1" in r for r in validation)
    final = json.loads((tmp_path / "eval.json").read_text())
    assert final["split"] == "test" and final["metrics"] == metrics and full == len(trainer.test_set)
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at step 13
    loss = trainer.loss_fn.base
    assert int(loss.bank_step) == 12 and bool(loss.in_bank.all())  # refreshed before the last step
    with pytest.raises(ValueError, match="eval.split=validation needs data.validation_fraction"):
        Trainer(_config(tmp_path / "y", "eval.split=validation"))


def test_a_run_killed_between_log_lines_logs_the_same_losses_after_resume(tmp_path):
    """The window of losses since the last log line is in the checkpoint: a run interrupted at
    step 3 (log every 2) and resumed logs at step 4 the mean of steps 3 and 4, as a straight run."""
    common = ["loss.name=gamma", "train.log_every=2", "train.checkpoint_every_steps=3", "optim.max_steps=7"]
    straight = Trainer(_config(tmp_path / "a", *common))
    straight.train_until(7)
    first = Trainer(_config(tmp_path / "b", *common))
    save = first.save

    def save_then_die():
        path = save()
        if first.step == 3:
            raise KeyboardInterrupt  # killed right after the checkpoint of step 3
        return path

    first.save = save_then_die
    with pytest.raises(KeyboardInterrupt):
        first.train_until(7)
    resumed = Trainer(_config(tmp_path / "b", *common))
    resumed.resume()
    resumed.train_until(7)

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "b") == losses(tmp_path / "a") and [s for s, _ in losses(tmp_path / "a")] == [2, 4, 6, 7]


def test_trainers_of_one_config_start_from_the_same_python_random_state(tmp_path):
    """A reader's lazy imports may draw from Python's RNG (digits: sklearn -> rich); the trainer
    reseeds it after building the data. A fresh interpreter, where those imports happen first."""
    import subprocess
    import sys

    code = (
        "import random; from plait.config import load_config; from plait.training import Trainer\n"
        "states = []\n"
        "for run in 'ab':\n"
        f"    Trainer(load_config('tiny', [f'output_dir={tmp_path}/{{run}}'])); states.append(random.getstate())\n"
        "print(states[0] == states[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def test_evaluations_during_training_leave_the_random_stream_alone(tmp_path):
    """With dropout (which draws from torch's global RNG), a run with staleness passes and periodic
    evaluations trains the same weights as one without: changing these resumable keys must not
    change the training."""
    common = ["model.a.dropout=0.5", "optim.epochs=3", "optim.max_steps=null", "data.batch_size=256", "eval.tasks=[retrieval]",
              "data.validation_fraction=0.2"]
    weights = []
    for name, extra in (("plain", ["train.staleness_every_epochs=0", "train.eval_every_epochs=0"]),
                        ("evaluated", ["train.staleness_every_epochs=1", "train.eval_every_epochs=1"])):
        trainer = Trainer(_config(tmp_path / name, *common, *extra))
        trainer.train_until(trainer.total_steps)
        weights.append(trainer.model.state_dict())
    records = [json.loads(line) for line in (tmp_path / "evaluated" / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("split") for r in records} >= {"staleness", "validation"}  # the passes did run
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
