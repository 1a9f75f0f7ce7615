"""The fusion model through the trainer and ``plait finetune``, on small emoji runs."""

import json

import pytest
import torch

from plait.cli import main
from plait.config import load_config
from plait.finetune import accuracy, finetune, finetune_config
from plait.training import Trainer, train

SMALL = ["data.options.image_size=16", "model.fusion.image_size=16", "model.fusion.patch=8", "model.fusion.queue_size=64",
         "model.fusion.text_layers=1", "model.fusion.fusion_layers=1", "model.fusion.vision_layers=1",
         "model.fusion.max_length=16", "data.augment.image=false", "eval.tasks=[retrieval]", "train.log_every=2"]


def _config(run, *overrides):
    return load_config("fusion", [f"output_dir={run}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fusion") / "run"
    train(_config(run, "optim.max_steps=4"))
    return run


def test_fusion_pretraining_logs_its_terms_and_resumes_bitwise(tmp_path):
    """ITC, ITM and MLM are logged; a run stopped at step 3 and resumed to 6 equals a straight run
    bit for bit: weights, momentum encoders, queue and its pointer (all in the model's state_dict)."""
    # deterministic mode, as README promises a bitwise resume: with 2 threads the embeddings' backward
    # sums in a varying order, so two straight runs in one process part at step 4 without it
    straight = Trainer(_config(tmp_path / "a", "optim.max_steps=6", "train.deterministic=true"))
    straight.train_until(6)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all({"itc", "itm", "mlm", "itm_accuracy", "queue_filled"} <= set(r) for r in records)
    assert records[-1]["queue_filled"] == 64  # 6 steps of 32 momentum features fill a queue of 64
    first = Trainer(_config(tmp_path / "b", "optim.max_steps=6", "train.checkpoint_every_steps=3", "train.deterministic=true"))
    first.train_until(3)
    resumed = Trainer(_config(tmp_path / "b", "optim.max_steps=6", "train.checkpoint_every_steps=3", "train.deterministic=true"))
    resumed.resume()
    resumed.train_until(6)
    ours, theirs = straight.model.state_dict(), resumed.model.state_dict()
    assert set(ours) == set(theirs) and any(k.startswith("momentum_models.") for k in ours) and "queue.ptr" in ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_regularisers_add_to_the_models_itc_and_gamma_replaces_it(tmp_path):
    """With loss.name=momentum_itc the objective holds only the regularisers, added to the model's
    loss; with the gamma loss the objective is the ITC (its per-sample state gets written)."""
    reg = Trainer(_config(tmp_path / "r", "optim.max_steps=2", "regularizers=[{name: consistency, weight: 0.5}]"))
    assert reg.loss_fn.base is None and reg.loss_fn.names == ["consistency"]
    reg.train_until(1)
    assert "itc/consistency" in reg.terms and float(reg.terms["itc/consistency"]) > 0
    gamma = Trainer(_config(tmp_path / "g", "optim.max_steps=2", "loss.name=gamma"))
    gamma.train_until(2)
    state = gamma.loss_fn.base.state_dict()
    assert int(state["step"]) == 2 and int((state["visits"] > 0).sum()) == 2 * 32  # two batches of 32 items visited
    assert int(gamma.model.queue.ptr) == 0 and int((gamma.model.queue.index >= 0).sum()) == 0  # the queue is not used
    with pytest.raises(ValueError, match="needs model.kind=fusion"):
        Trainer(load_config("tiny", [f"output_dir={tmp_path}/t", "loss.name=momentum_itc"]))


def test_finetune_trains_a_head_and_reports_accuracy_checked_by_hand(fusion_run, tmp_path):
    result = finetune(fusion_run / "model.safetensors", "entailment",
                      [f"output_dir={tmp_path}/ve", "max_steps=3", "batch_size=16", "task_options={per_image: 0.2}"])
    saved = json.loads((tmp_path / "ve" / "finetune.json").read_text())
    assert saved["metrics"] == result["metrics"] and result["steps"] == 3 and result["num_classes"] == 3
    assert 0.0 <= result["metrics"]["test_accuracy"] <= 1.0
    # accuracy() against a brute-force count over the items
    from plait.data.tasks import EmojiEntailment
    from plait.evaluate.run import load_model
    from plait.models.fusion import FusionClassifier

    backbone, _ = load_model(fusion_run / "model.safetensors")
    classifier = FusionClassifier(backbone, "entailment", num_classes=3).eval()
    test = EmojiEntailment("test", image_size=16, per_image=0.1)
    with torch.no_grad():
        correct = sum(int(classifier(test[i][1][None], [test[i][2]]).argmax(1).item() == test[i][3]) for i in range(len(test)))
    assert accuracy(classifier, test, 7, torch.device("cpu")) == pytest.approx(correct / len(test))


def test_finetune_refuses_a_two_tower_model_and_bad_settings(tmp_path, capsys):
    run = tmp_path / "tiny"
    train(load_config("tiny", [f"output_dir={run}", "train.staleness_every_epochs=0"]))
    assert main(["finetune", str(run / "model.safetensors"), "--task", "vqa"]) == 2
    assert "fine-tuning needs a fusion model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bad override 'epochs=many'"):
        finetune_config("vqa", ["epochs=many"])
    with pytest.raises(ValueError, match="lr must be positive"):
        finetune_config("vqa", ["lr=0"])


def test_the_trainer_drives_the_fusion_models_seed_momentum_and_loss(tmp_path):
    """The run's seed reaches the model's own draws; after_optimizer_step moves the momentum
    copies by the EMA; the regulariser is in the back-propagated loss (not only logged)."""
    from plait.models.contract import Batch

    one, two = (Trainer(_config(tmp_path / f"s{seed}", f"seed={seed}", "optim.max_steps=1")) for seed in (0, 1))
    assert (one.model.seed, two.model.seed) == (0, 1)
    assert one.model.provides_augmented and one.loss_fn.needs_augmented is False
    online = {name: [p.detach().clone() for p in getattr(one.model, name).parameters()] for name in one.model.momentum_names}
    slow = {name: [p.clone() for p in one.model.momentum_models[name].parameters()] for name in one.model.momentum_names}
    one.train_until(1)
    m = one.model.momentum
    for name in one.model.momentum_names:  # theta_m <- m theta_m + (1 - m) theta (theta after the step)
        for before, after, fast in zip(slow[name], one.model.momentum_models[name].parameters(),
                                       getattr(one.model, name).parameters()):
            torch.testing.assert_close(after, m * before + (1 - m) * fast.detach())
        assert any(not torch.equal(a, b) for a, b in zip(online[name], getattr(one.model, name).parameters()))
    reg = Trainer(_config(tmp_path / "r", "optim.max_steps=1", "regularizers=[{name: consistency, weight: 0.5}]"))
    images, texts = torch.stack([reg.train_set[i][1] for i in range(8)]), [reg.train_set[i][2] for i in range(8)]
    batch = Batch(torch.arange(8), images, texts)
    state = {k: v.clone() for k, v in reg.model.state_dict().items()}
    with_reg = reg.model.training_step(batch, reg.loss_fn)
    reg.model.load_state_dict(state)  # the same draws again (steps, queue)
    from plait.losses.objective import ContrastiveObjective

    alone = reg.model.training_step(batch, ContrastiveObjective(None))
    expected = alone.loss + reg.model.weights["itc"] * 0.5 * with_reg.terms["itc/consistency"]
    torch.testing.assert_close(with_reg.loss, expected)


def test_finetune_refuses_a_backbone_pretrained_on_other_splits_and_grad_clip_zero_trains(fusion_run, tmp_path):
    with pytest.raises(ValueError, match="could have been pre-training pairs"):
        finetune(fusion_run / "model.safetensors", "vqa", ["task_options={split_seed: 1}", "max_steps=1"])
    a = finetune(fusion_run / "model.safetensors", "entailment", [f"output_dir={tmp_path}/a", "max_steps=3", "batch_size=16",
                                                                  "grad_clip=0", "task_options={per_image: 0.2}"])
    assert a["steps"] == 3 and json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])["loss"] > 0


def test_pretrain_then_finetune_then_report_through_the_cli(tmp_path, capsys):
    """``plait train fusion`` -> ``plait finetune WEIGHTS --task reasoning`` -> ``plait report``, end to
    end through ``main``: exit codes 0, the printed JSON equals finetune.json, the report lists it."""
    run = tmp_path / "pre"
    assert main(["train", "fusion", f"output_dir={run}", *SMALL, "optim.max_steps=3"]) == 0
    assert (run / "model.safetensors").is_file()
    capsys.readouterr()
    tuned = run / "finetune-reasoning"
    assert main(["finetune", str(run / "model.safetensors"), "--task", "reasoning", f"output_dir={tuned}",
                 "max_steps=2", "batch_size=16", "task_options={pairs: 200}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tuned / "finetune.json").read_text())
    assert printed == saved["metrics"] and saved["steps"] == 2 and saved["num_classes"] == 2
    assert 0.0 <= printed["test_accuracy"] <= 1.0
    assert main(["report", str(run)]) == 0
    row = f"| reasoning | 2 | {100 * saved['metrics']['validation_accuracy']:.1f} | {100 * printed['test_accuracy']:.1f} |"
    assert "## Fine-tuning" in (run / "report.md").read_text() and row in (run / "report.md").read_text()
