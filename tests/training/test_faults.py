"""The trainer under faults and bad input: non-finite steps, runs never replaced, resumes that
refuse changed settings or data, resume hygiene, settings checked before anything is written,
and data without a test split. All on the tiny config (digits 8x8, 16-item batches)."""

import errno
import json
import os

import pytest
import torch

from plait.checkpoint import load_checkpoint
from plait.cli import main
from plait.config import UNSET, config_differences, load_config
from plait.data.digits import DigitsDataset
from plait.data.sampler import EpochSampler
from plait.optim import warmup_cosine
from plait.training import MAX_CONSECUTIVE_SKIPS, Trainer, data_fingerprint, train

FAST = ["eval.tasks=[retrieval]"]


def _config(run, *overrides):
    return load_config("tiny", [f"output_dir={run}", *overrides])


def _order() -> list[int]:
    """The training items of epoch 0 in the tiny config's order (seed 0)."""
    return list(EpochSampler(len(DigitsDataset("train", image_size=8)), seed=0))


def _poison(monkeypatch, item: int) -> None:
    """Training item ``item``'s image becomes NaN (a corrupt input)."""
    original = DigitsDataset.view_a

    def view_a(self, i):
        image = original(self, i)
        return torch.full_like(image, float("nan")) if self.split == "train" and i == item else image

    monkeypatch.setattr(DigitsDataset, "view_a", view_a)


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _saves(monkeypatch) -> list[bytes]:
    """The bytes of checkpoint.pt after each save."""
    saved, original = [], Trainer.save

    def save(self):
        path = original(self)
        saved.append(path.read_bytes())
        return path

    monkeypatch.setattr(Trainer, "save", save)
    return saved


# ------------------------------------------------------------------------------ non-finite steps
def test_nonfinite_loss_stops_naming_step_batch_and_the_untouched_last_checkpoint(tmp_path, monkeypatch):
    order = _order()
    bad = order[2 * 16 + 5]  # in the batch of step 3
    _poison(monkeypatch, bad)
    saves = _saves(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(ValueError) as caught:
        train(_config(run, "train.checkpoint_every_steps=2", *FAST))
    message = str(caught.value)
    assert "\n" not in message
    assert "step 3: non-finite loss" in message and "epoch 0, batch 3 of the epoch" in message
    assert f"training-set indices {', '.join(map(str, order[32:40]))}, ... (16 items)" in message
    assert f"non-finite features (a) of item(s) {bad}" in message  # the culprit, not just its batch
    assert f"the last good checkpoint is {run / 'checkpoint.pt'} (step 2), left untouched" in message
    assert len(saves) == 1 and (run / "checkpoint.pt").read_bytes() == saves[0]  # no save after the fault
    assert load_checkpoint(run / "checkpoint.pt")["progress"]["step"] == 2
    assert not (run / "model.safetensors").exists() and not (run / "eval.json").exists()
    assert [r["step"] for r in _records(run)] == [2]


def test_skip_takes_no_optimizer_step_but_keeps_the_schedule_and_logs_the_count(tmp_path, monkeypatch):
    """A skipped step leaves every parameter as it was, the scheduler still counts it (lr of step 4 =
    lr * factor(3)), the log window's loss is the mean of the steps taken, and the state stays finite."""
    order = _order()
    bad = order[2 * 16 + 5]
    _poison(monkeypatch, bad)
    trainer = Trainer(_config(tmp_path, "train.on_nonfinite=skip", *FAST))
    losses = {}
    original = trainer.train_step

    def spy(index, a, b):
        loss = original(index, a, b)
        losses[trainer.step + 1] = loss
        return loss

    trainer.train_step = spy
    trainer.train_until(2)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train_until(3)
    assert losses[3] is None and trainer.skipped_steps == 1 and trainer.consecutive_skips == 1
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
    factor = warmup_cosine(trainer.schedule_steps, max(1, int(0.05 * trainer.schedule_steps)))
    assert trainer.scheduler.last_epoch == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor(3), rel=1e-12)
    trainer.train_until(6)
    assert trainer.consecutive_skips == 0 and not torch.equal(dict(trainer.model.named_parameters())["logit_scale"],
                                                              before["logit_scale"])
    records = _records(tmp_path)
    # train_until(n) also logs at step n: windows (1, 2), (3), (4), (5, 6)
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(2, 0), (3, 1), (4, 1), (6, 1)]
    assert records[1]["loss"] is None  # a window of skipped steps only has no loss
    assert records[2]["loss"] == pytest.approx(losses[4].item(), rel=1e-6)
    assert records[3]["loss"] == pytest.approx((losses[5].item() + losses[6].item()) / 2, rel=1e-6)
    state = trainer.loss_fn.base
    assert all(bool(torch.isfinite(b).all()) for b in state.buffers() if b.is_floating_point())
    assert int(state.visits[bad]) == 0  # the poisoned item never reached the state
    # the count survives a checkpoint
    trainer.save()
    resumed = Trainer(_config(tmp_path, "train.on_nonfinite=skip", *FAST))
    resumed.resume()
    assert resumed.skipped_steps == 1


@pytest.mark.parametrize("loss", ["gamma", "sogclr"])
def test_huge_lr_with_skip_keeps_every_loss_buffer_finite_and_stops_after_consecutive_skips(tmp_path, loss):
    """lr = 1e6: after one step the text tower's output collapses to zero rows; under skip every later
    step is skipped, the per-sample state (and the gamma loss's memory bank) stays finite, and the run
    stops after MAX_CONSECUTIVE_SKIPS skips in a row, without writing a model."""
    trainer = Trainer(_config(tmp_path, f"loss.name={loss}", "optim.lr=1e6", "optim.max_steps=40", "train.on_nonfinite=skip",
                              "train.checkpoint_every_steps=1", *FAST))
    with pytest.raises(ValueError, match=f"{MAX_CONSECUTIVE_SKIPS} consecutive steps were skipped") as caught:
        trainer.train_until(40)
    # step 1 is taken, steps 2 .. 21 are skipped: the 20th skip in a row stops the run
    assert "all-zero features" in str(caught.value) and f"at step {MAX_CONSECUTIVE_SKIPS + 1}:" in str(caught.value)
    assert trainer.skipped_steps == MAX_CONSECUTIVE_SKIPS and trainer.step == MAX_CONSECUTIVE_SKIPS
    buffers = {name: b for name, b in trainer.loss_fn.named_buffers() if b.is_floating_point()}
    assert "base.log_z" in buffers and (loss != "gamma" or buffers["base.bank"].numel() > 0)
    for name, b in buffers.items():
        assert bool(torch.isfinite(b).all()), name
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_nonfinite_gradient_with_a_finite_loss_is_caught_with_or_without_clipping(tmp_path, clip):
    trainer = Trainer(_config(tmp_path, f"optim.grad_clip={clip}", *FAST))
    trainer.train_until(1)
    scale = dict(trainer.model.named_parameters())["logit_scale"]
    scale.register_hook(lambda grad: grad * float("inf"))  # a finite loss, an infinite gradient
    with pytest.raises(ValueError, match=r"step 2: non-finite gradient \(total norm (nan|inf); loss [0-9.]+\)"):
        trainer.train_until(2)


def test_a_model_with_nonfinite_parameters_is_never_saved_or_exported(tmp_path):
    trainer = Trainer(_config(tmp_path, *FAST))
    trainer.train_until(2)
    trainer.save()
    good = (tmp_path / "checkpoint.pt").read_bytes()
    name, parameter = next(iter(trainer.model.named_parameters()))
    with torch.no_grad():
        parameter.view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=rf"not writing .*checkpoint.pt: the model's {name} is not finite at step 2; "
                                         r"the last good checkpoint is .*checkpoint.pt \(step 2\)"):
        trainer.save()
    with pytest.raises(ValueError, match=rf"not writing .*model.safetensors: the model's {name} is not finite"):
        trainer.export()
    with pytest.raises(ValueError, match="not writing .*checkpoint.pt"):
        trainer.finish()  # saves (refused) before it exports or evaluates
    assert (tmp_path / "checkpoint.pt").read_bytes() == good and not (tmp_path / "model.safetensors").exists()


# ------------------------------------------------------------------------------ runs are never destroyed
def test_a_new_run_refuses_an_output_dir_holding_a_run_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "tiny", f"output_dir={run}", *FAST]
    assert main(args) == 0
    first = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "model.safetensors", "eval.json", "metrics.jsonl")}
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args, "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output_dir {run} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in first} == first
    with pytest.raises(ValueError, match="already holds a run"):
        train(_config(run, *FAST))
    with pytest.raises(ValueError, match="exclude each other"):
        train(_config(run, *FAST), resume=True, overwrite=True)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"old")
    assert main([*args, "optim.lr=0.01", "--overwrite"]) == 0
    assert [r["step"] for r in _records(run) if r.get("split") is None] == [2, 4, 6]  # one run's lines only
    assert [r.get("split") for r in _records(run)].count("eval") == 1
    assert (run / "notes.txt").read_text() == "mine" and not (run / "tensorboard").exists()
    assert (run / "eval.json").read_bytes() != first["eval.json"]
    # `--resume key=value`: argparse hands the override to --resume; it is still an override
    assert main([*args, "optim.lr=0.01", "--resume", "train.log_every=3"]) == 0
    assert [r.get("split") for r in _records(run)].count("eval") == 1


# ------------------------------------------------------------------------------ resume checks
def _checkpointed(run, *overrides) -> Trainer:
    trainer = Trainer(_config(run, *overrides))
    trainer.train_until(2)
    trainer.save()
    return trainer


def test_resume_refuses_changed_settings_naming_each_key_and_allows_the_safe_ones(tmp_path):
    first = _checkpointed(tmp_path, *FAST)
    with pytest.raises(ValueError) as caught:
        Trainer(_config(tmp_path, "data.batch_size=32", "optim.lr=0.01", "seed=3", "loss.options.gamma=0.5", *FAST)).resume()
    message = str(caught.value)
    assert message.startswith(f"cannot resume from {tmp_path / 'checkpoint.pt'} with changed settings: ")
    for change in ("seed: 0 in the checkpoint, 3 now", "data.batch_size: 16 in the checkpoint, 32 now",
                   "optim.lr: 0.001 in the checkpoint, 0.01 now", "loss.options.gamma: unset in the checkpoint, 0.5 now"):
        assert change in message
    with pytest.raises(ValueError, match=r"data.options.image_size: 8 in the checkpoint, 6 now"):
        Trainer(_config(tmp_path, "data.options.image_size=6", *FAST)).resume()
    # the schedule's length may not change: one epoch of len // 16 steps in the checkpoint
    with pytest.raises(ValueError, match=rf"optim.epochs: 1 in the checkpoint, 2 now \(the lr schedule would span "
                                         rf"{2 * first.steps_per_epoch} steps instead of {first.steps_per_epoch}"):
        Trainer(_config(tmp_path, "optim.epochs=2", *FAST)).resume()
    # the same length spelled as a step budget, and every key that only changes logging, saving or evaluation
    safe = Trainer(_config(tmp_path, f"optim.steps={first.steps_per_epoch}", "optim.max_steps=4", "train.log_every=1",
                           "train.checkpoint_every_steps=3", "train.on_nonfinite=skip", "data.num_workers=0",
                           "eval.tasks=[retrieval,knn]", "name=renamed"))
    safe.resume()
    assert safe.step == 2
    # another model shape reaching the weights is a one-line ValueError too
    other = Trainer(_config(tmp_path / "other", "data.options.image_size=6", *FAST))
    with pytest.raises(ValueError, match="the checkpoint's model does not fit this config's model: size mismatch"):
        other.load_state(load_checkpoint(tmp_path / "checkpoint.pt"))


def test_resume_refuses_other_training_data(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(30):
        Image.new("RGB", (8, 8), color=(8 * i, 200 - 5 * i, 90)).save(tmp_path / "img" / f"{i}.png")

    def write_csv(rows):
        (tmp_path / "pairs.csv").write_text("image,text\n" + "".join(f"img/{i}.png,{caption}\n" for i, caption in rows))

    captions = [(i, f"swatch {i}") for i in range(24)]
    write_csv(captions)
    data = ["data.name=csv", f"data.options.path={tmp_path / 'pairs.csv'}", "data.options.image_size=8",
            "data.options.test_fraction=0.25", "data.batch_size=6", *FAST]
    run = tmp_path / "run"
    _checkpointed(run, *data)
    write_csv([(i, f"patch {i}") for i in range(24)])
    with pytest.raises(ValueError,
                       match=r"the training data differ from the checkpoint's \(same size \(18 items\) but different data\)"):
        Trainer(_config(run, *data)).resume()
    write_csv([*captions, *((i, f"swatch {i}") for i in range(24, 30))])
    with pytest.raises(ValueError,
                       match=r"the training data differ from the checkpoint's \(18 items in the checkpoint, 22 now\)"):
        Trainer(_config(run, *data)).resume()
    write_csv(captions)
    Trainer(_config(run, *data)).resume()  # the original data resume


def test_resume_truncates_metrics_and_removes_stale_temp_files(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(_config(run, "train.checkpoint_every_steps=4", *FAST))
    trainer.train_until(6)  # logs steps 2, 4, 6; the checkpoint is at step 4
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 0.1')  # a line torn by a crash
    for stale in (".checkpoint.pt.tmp-abc123", ".model.safetensors.tmp-x9"):
        (run / stale).write_bytes(b"half")
    (run / "keep.tmp").write_text("not plait's")
    metrics = train(_config(run, *FAST), resume=True)
    records = _records(run)
    assert [r["step"] for r in records if r.get("split") is None] == [2, 4, 6]
    assert [r["step"] for r in records if r.get("split") == "eval"] == [6]
    assert sorted(p.name for p in run.iterdir() if ".tmp" in p.name) == ["keep.tmp"]
    assert metrics == json.loads((run / "eval.json").read_text())["metrics"]
    # resuming the finished run drops the evaluation logged after its last checkpoint, then logs it again
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert load_checkpoint(run / "checkpoint.pt")["progress"]["metrics_lines"] == len(lines) - 1
    assert train(_config(run, *FAST), resume=True) == metrics
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 6]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save, calls, previous = torch.save, [], []

    def full_disk(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, handle, *args, **kwargs)
        previous.append((run / "checkpoint.pt").read_bytes())
        handle.write(b"x" * 1000)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", "tiny", f"output_dir={run}", "train.checkpoint_every_steps=2", *FAST]) == 2
    err = capsys.readouterr().err
    assert err == (f"plait: error: could not write {run / 'checkpoint.pt'}: No space left on device "
                   "(the previous checkpoint.pt is unchanged)\n")
    assert (run / "checkpoint.pt").read_bytes() == previous[0]
    assert load_checkpoint(run / "checkpoint.pt")["progress"]["step"] == 2
    assert [p.name for p in run.iterdir() if ".tmp-" in p.name] == []


# ------------------------------------------------------------------------------ settings, before any write
@pytest.mark.parametrize("override, expected", [
    ("optim.epochs=0", "optim.epochs=0 is not valid: it must be a positive integer"),
    ("optim.max_steps=0", "optim.max_steps=0 is not valid"),
    ("optim.max_steps=-3", "optim.max_steps=-3 is not valid"),
    ("optim.steps=0", "optim.steps=0 is not valid"),
    ("optim.lr=0", "optim.lr=0.0 is not valid: it must be a positive number"),
    ("optim.lr=-0.1", "optim.lr=-0.1 is not valid"),
    ("optim.warmup_fraction=1.0", "optim.warmup_fraction=1.0 is not valid: it must be in [0, 1)"),
    ("optim.warmup_fraction=-0.5", "optim.warmup_fraction=-0.5 is not valid"),
    ("train.log_every=0", "train.log_every=0 is not valid"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite='ignore' is not valid: valid: stop, skip"),
    ("eval.tasks=[retreival]",
     "eval.tasks has unknown task(s) 'retreival'; valid: retrieval, zero_shot, linear_probe, few_shot, knn"),
    ("eval.label=colour", "eval.label='colour' is not a label set of the digits data; valid: digit"),
    ("train.device=gpu",
     "train.device='gpu' is not a device plait runs on; valid: auto, cpu, cuda, cuda:N (N: a GPU's index), mps"),
    ("train.precision=fp8", "train.precision must be one of auto, fp32, fp64, bf16, fp16, got 'fp8'"),
    ("train.grad_cache_chunk=-4", "train.grad_cache_chunk=-4 is not valid: it must be an integer >= 0 (0: off)"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s=0.0 is not valid: it must be a positive number of seconds"),
    # evaluation settings that would fail only after training
    ("eval.features=bogus", "eval.features='bogus' is not valid: valid: shared, independent, both"),
    ("eval.batch_size=0", "eval.batch_size=0 is not valid: it must be a positive integer"),
    ("eval.few_shot=[-1]", "eval.few_shot=[-1] is not valid: it must be a list of positive integers"),
    ("eval.few_shot_seeds=-1", "eval.few_shot_seeds=-1 is not valid: it must be a positive integer"),
    ("eval.gallery=-1", "eval.gallery=-1 is not valid: it must be >= 0"),
    ("eval.features=independent", "eval.features='independent' needs a model with independent heads"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, override, expected):
    run = tmp_path / "run"
    with pytest.raises(ValueError) as caught:
        Trainer(_config(run, override))
    assert expected in str(caught.value)
    assert not run.exists()


def test_bad_settings_on_the_command_line_and_no_step_limit(tmp_path, capsys):
    assert main(["train", "tiny", f"output_dir={tmp_path / 'run'}", "optim.max_steps=0"]) == 2
    assert "optim.max_steps=0 is not valid" in capsys.readouterr().err and not (tmp_path / "run").exists()
    trainer = Trainer(_config(tmp_path, "optim.max_steps=null"))
    assert trainer.total_steps == trainer.steps_per_epoch == len(trainer.train_set) // 16


# ------------------------------------------------------------------------------ no test split
def test_an_empty_test_split_trains_and_skips_the_final_evaluation(tmp_path, monkeypatch, capsys):
    import plait.data
    from plait.data.base import ImagePairDataset

    real = plait.data.build_dataset

    def without_test(name, split="train", **options):
        if split == "test":
            return ImagePairDataset(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), [])
        return real(name, split=split, **options)

    monkeypatch.setattr(plait.data, "build_dataset", without_test)
    run = tmp_path / "run"
    assert main(["train", "tiny", f"output_dir={run}", "train.eval_every_epochs=1", "optim.epochs=2", "optim.max_steps=null",
                 "data.batch_size=256"]) == 0
    captured = capsys.readouterr()
    assert "the final evaluation was skipped: no test split" in captured.err
    result = json.loads((run / "eval.json").read_text())
    assert result["metrics"] == {} and result["skipped"].startswith("no test split") and result["steps"] == 10
    assert (run / "model.safetensors").is_file() and (run / "report.md").is_file()
    assert all(r.get("split") in (None, "staleness") for r in _records(run))
    # with a validation split the final evaluation reads it
    metrics = train(_config(tmp_path / "validation", "data.validation_fraction=0.2", "eval.split=validation", *FAST))
    assert 0 <= metrics["image_retrieval_recall@1"] <= 1


def test_user_csv_with_test_fraction_zero_has_no_test_split_and_trains(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(20):
        Image.new("RGB", (8, 8), color=(12 * i, 90, 200 - 9 * i)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "pairs.csv").write_text("image,text\n" + "".join(f"img/{i}.png,swatch {i}\n" for i in range(20)))
    run = tmp_path / "run"
    assert main(["train", "tiny", f"output_dir={run}", "data.name=csv", f"data.options.path={tmp_path / 'pairs.csv'}",
                 "data.options.image_size=8", "data.options.test_fraction=0", "data.batch_size=5", *FAST]) == 0
    assert "the final evaluation was skipped: no test split" in capsys.readouterr().err
    assert json.loads((run / "eval.json").read_text())["steps"] == 4  # 20 items / 5 per batch, one epoch


# ------------------------------------------------------------------------------ helpers
def test_config_differences_and_the_data_fingerprint():
    saved = load_config("tiny", ["loss.options.estimator=ema"])
    current = load_config("tiny", ["optim.lr=0.5", "train.log_every=1", "eval.gallery=0", "optim.betas=[0.9,0.99]"])
    assert config_differences(saved, current) == [("loss.options.estimator", "ema", UNSET), ("optim.lr", 0.001, 0.5),
                                                  ("optim.betas", [0.9, 0.98], [0.9, 0.99])]
    dataset = DigitsDataset("train", image_size=8)
    rng = torch.get_rng_state()
    first = data_fingerprint(dataset)
    assert torch.equal(torch.get_rng_state(), rng)  # the global random stream is untouched
    assert first == data_fingerprint(dataset, batch_size=7) and first["size"] == len(dataset)
    dataset.texts[5] = dataset.texts[5] + " "
    assert data_fingerprint(dataset)["sha256"] != first["sha256"]


# ------------------------------------------------------------------------------ review: runs, checkpoints, bad input
def test_a_resume_from_another_runs_checkpoint_never_replaces_the_run_in_output_dir(tmp_path, capsys):
    """`--resume OTHER/checkpoint.pt` into an output_dir that holds a run is refused naming both;
    into an empty output_dir it forks OTHER's run there; naming output_dir's own checkpoint is --resume."""
    first, second = tmp_path / "a", tmp_path / "b"
    train(_config(first, *FAST))
    train(_config(second, *FAST, "optim.lr=0.01"))
    kept = {name: (second / name).read_bytes() for name in ("checkpoint.pt", "model.safetensors", "eval.json", "metrics.jsonl")}
    capsys.readouterr()
    assert main(["train", "tiny", f"output_dir={second}", *FAST, "--resume", str(first / "checkpoint.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {first / 'checkpoint.pt'} continues another run's checkpoint" in err
    assert f"output_dir {second} already holds a run" in err and "which the resumed run would replace" in err
    assert {name: (second / name).read_bytes() for name in kept} == kept
    with pytest.raises(ValueError, match="continues another run's checkpoint"):
        train(_config(second, *FAST), resume=str(first / "checkpoint.pt"))
    # forking into an empty directory, and the run's own checkpoint spelled out, are fine
    assert train(_config(tmp_path / "fork", *FAST), resume=str(first / "checkpoint.pt")) == \
        json.loads((first / "eval.json").read_text())["metrics"]
    assert train(_config(second, *FAST, "optim.lr=0.01"), resume=str(second / "checkpoint.pt")) == \
        json.loads((second / "eval.json").read_text())["metrics"]


def _crafted_checkpoints(path):
    """(name, change, message) of checkpoints a resume must refuse before loading anything."""
    def optimizer_shape(state):
        entry = next(iter(state["optimizer"]["state"].values()))
        entry["exp_avg"] = torch.zeros(3, 3)

    return [
        ("no progress", lambda s: s.pop("progress"), "progress is missing"),
        ("step of another type", lambda s: s["progress"].update(step="x"), "progress.step is 'x', not an integer >= 0"),
        ("negative step", lambda s: s["progress"].update(step=-100), "progress.step is -100, not an integer >= 0"),
        ("batch beyond the epoch", lambda s: s["progress"].update(batch_in_epoch=10**9),
         "progress says step 2 at epoch 0, batch 1000000000, which does not fit this run's"),
        ("step off its epoch", lambda s: s["progress"].update(step=5), "progress says step 5 at epoch 0, batch 2"),
        ("torn window", lambda s: s["progress"].update(window_losses=[float("nan")]), "progress.window_losses is not a list"),
        ("bad rng", lambda s: s.update(rng={"torch": torch.zeros(3, dtype=torch.uint8)}),
         "rng is not a random state plait wrote"),
        ("short torch rng", lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
         "rng is not a random state plait wrote (torch:"),
        ("bad python rng", lambda s: s["rng"].update(python=(3, (1, 2), None)), "rng is not a random state plait wrote (python:"),
        ("empty loss state", lambda s: s.update(loss={}), "loss does not fit this run's loss: "),
        ("loss of another type", lambda s: s.update(loss=[1]), "loss is a list, not a dict"),
        ("empty optimizer", lambda s: s.update(optimizer={"state": {}, "param_groups": []}),
         "optimizer.param_groups do not match this run's parameter groups"),
        ("optimizer state of another shape", optimizer_shape, "has shape (3, 3), its parameter"),
        ("scheduler elsewhere", lambda s: s["scheduler"].update(last_epoch=40), "scheduler.last_epoch is 40, not the step 2"),
        ("no model", lambda s: s.pop("model"), "model is missing"),
    ]


def test_corrupt_or_crafted_checkpoints_are_refused_naming_the_key_before_anything_is_loaded(tmp_path):
    from plait.checkpoint import save_checkpoint

    run = tmp_path / "run"
    _checkpointed(run, *FAST)
    good = load_checkpoint(run / "checkpoint.pt")
    for name, change, message in _crafted_checkpoints(run):
        state = {k: v for k, v in load_checkpoint(run / "checkpoint.pt").items() if k != "format"}
        change(state)
        path = tmp_path / f"{name.replace(' ', '-')}.pt"
        save_checkpoint(path, state)
        trainer = Trainer(_config(tmp_path / "new", *FAST))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        with pytest.raises(ValueError) as caught:
            trainer.resume(path)
        text = str(caught.value)
        assert message in text and "\n" not in text and text.startswith(f"cannot resume from {path}"), (name, text)
        assert trainer.step == 0 and all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items()), name
    assert good["progress"]["step"] == 2  # the checkpoint itself resumes
    resumed = Trainer(_config(run, *FAST))
    resumed.resume()
    assert resumed.step == 2


def test_output_dir_that_is_a_file_or_unwritable_and_eval_out_at_a_file_are_one_line(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for target, message in ((afile, f"output_dir {afile} is a file, not a directory"),
                            (afile / "run", f"output_dir {afile / 'run'} cannot be created: {afile} is a file, not a directory")):
        capsys.readouterr()
        assert main(["train", "tiny", f"output_dir={target}", *FAST]) == 2
        assert capsys.readouterr().err == f"plait: error: {message}\n"
    assert afile.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    assert main(["train", "tiny", f"output_dir={locked / 'run'}", *FAST]) == 2
    assert f"cannot be created: {locked} is not writable (permission denied)" in capsys.readouterr().err
    run = tmp_path / "run"
    train(_config(run, *FAST))
    capsys.readouterr()
    assert main(["eval", str(run / "model.safetensors"), "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"plait: error: --out {afile} is a file, not a directory\n"


def test_a_full_disk_while_logging_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every append fails: No space left on device
    assert main(["train", "tiny", f"output_dir={run}", *FAST, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"plait: error: could not append to {run / 'metrics.jsonl'}: No space left on device (step 2; ")


@pytest.mark.parametrize("overrides, expected", [
    (["data.augment.image=true", "data.augment.image_options.foo=1"],
     "data.augment.image_options has no option 'foo'; the image augmentation's options: crop_scale, flip, jitter, blur, seed"),
    (["data.augment.image=true", "data.augment.image_options.crop_scale=5"],
     "data.augment.image_options.crop_scale=5 is not valid: it must be [min, max] with 0 < min <= max <= 1"),
    (["data.augment.image=true", "data.augment.image_options.crop_scale=[0.5,2]"], "data.augment.image_options: "),
    (["data.augment.text=true", "data.augment.text_options.p_delete=3"], "data.augment.text_options: "),
    (["model.embed_dim=-5"], "model.embed_dim=-5 is not valid"),
    (["model.a.hidden=[-1]"], "model.a.hidden[0]=-1 is not valid"),
    (["model.projection_hidden=-1"], "model.projection_hidden=-1 is not valid"),
])
def test_bad_augmentation_options_and_sizes_are_one_line_before_anything_is_written(tmp_path, capsys, overrides, expected):
    run = tmp_path / "run"
    assert main(["train", "tiny", f"output_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not run.exists()


def test_resume_allows_moved_data_another_cache_and_the_same_precision_and_refuses_another_precision(tmp_path):
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for i in range(24):
        Image.new("RGB", (8, 8), color=(10 * i, 100, 200 - 8 * i)).save(data / "img" / f"{i}.png")
    (data / "pairs.csv").write_text("image,text\n" + "".join(f"img/{i}.png,swatch {i}\n" for i in range(24)))
    common = ["data.name=csv", "data.options.image_size=8", "data.options.test_fraction=0.25", "data.batch_size=6", *FAST]
    run = tmp_path / "run"
    _checkpointed(run, f"data.options.path={data / 'pairs.csv'}", *common)
    moved = tmp_path / "moved"
    shutil.move(str(data), moved)
    resumed = Trainer(_config(run, f"data.options.path={moved / 'pairs.csv'}", f"data.options.cache_dir={tmp_path / 'cache'}",
                              "train.precision=fp32", *common))
    resumed.resume()  # the fingerprint proves the moved data the same; auto and fp32 are both fp32 on the CPU
    assert resumed.step == 2
    with pytest.raises(ValueError, match=r"train.precision: the checkpoint trained in fp32, this run would use bf16 "
                                         r"\(train.precision=bf16 on cpu\); set train.precision=fp32 to resume it here"):
        Trainer(_config(run, f"data.options.path={moved / 'pairs.csv'}", "train.precision=bf16", *common)).resume()
    (moved / "pairs.csv").write_text("image,text\n" + "".join(f"img/{i}.png,patch {i}\n" for i in range(24)))
    with pytest.raises(ValueError, match="the training data differ from the checkpoint's"):  # moved and changed: refused
        Trainer(_config(run, f"data.options.path={moved / 'pairs.csv'}", *common)).resume()


def test_a_checkpoint_from_a_gpu_run_is_resumed_in_its_precision_and_its_random_states_load_on_the_cpu(tmp_path, monkeypatch):
    """A checkpoint written before the precision was stored, by a run on cuda with precision auto,
    trained in bf16: resuming it in fp32 is refused. Random states come back as CPU bytes whatever
    device or dtype the checkpoint's tensors were mapped to."""
    import random

    import numpy as np

    import plait.training.resume
    from plait import runtime
    from plait.checkpoint import save_checkpoint

    run = tmp_path / "run"
    _checkpointed(run, *FAST)
    state = {k: v for k, v in load_checkpoint(run / "checkpoint.pt").items() if k not in ("format", "precision")}
    state["config"] = state["config"].replace("device: auto", "device: cuda")
    save_checkpoint(tmp_path / "gpu.pt", state)
    with pytest.raises(ValueError, match="train.precision: the checkpoint trained in bf16, this run would use fp32"):
        Trainer(_config(tmp_path / "new", "train.device=cpu", *FAST)).resume(tmp_path / "gpu.pt")
    # the trainer reads checkpoints onto the CPU (set_rng_state needs CPU bytes; load_state_dict moves the rest)
    seen = []
    real = plait.training.resume.load_checkpoint
    monkeypatch.setattr(plait.training.resume, "load_checkpoint", lambda path, map_location="cpu": seen.append(map_location)
                        or real(path, map_location))
    Trainer(_config(run, *FAST)).resume()
    assert seen == ["cpu"]
    # set_rng_state takes a state whose tensors are of another dtype (as after another map_location)
    saved = runtime.rng_state()
    expected = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    moved = {**saved, "torch": saved["torch"].to(torch.int64),
             "numpy": {**saved["numpy"], "keys": saved["numpy"]["keys"].to(torch.int32)}}
    torch.rand(5), np.random.rand(3), random.random()
    runtime.check_rng_state(moved)
    runtime.set_rng_state(moved)
    assert torch.equal(torch.get_rng_state(), expected[0]) and (np.random.get_state()[1] == expected[1]).all()
    assert random.getstate() == expected[2]
