"""E5, tuned: a quick run end to end (the table from the runs' own files, choices from validation
scores, --reuse), and the choices made on validation scores only (the test metrics faked against them)."""

import json
import statistics
from pathlib import Path

import pytest

from plait.experiments import fusion
from plait.experiments.fusion import COLUMNS, TASKS, run_fusion_experiment


def _cell(values):
    return f"{100 * statistics.fmean(values):.1f} +- {100 * statistics.stdev(values):.1f}"


def test_quick_tuned_fusion_experiment_end_to_end(tmp_path):
    variants = ("albef", "gc")
    table = run_fusion_experiment(tmp_path, seeds=2, workers=1, quick=True, variants=variants)
    result = json.loads((tmp_path / "results.json").read_text())
    lrs = result["protocol"]["lrs"]
    assert len(lrs) == 2 and result["protocol"]["weight_multipliers"] == [0.5, 1.0]

    def finetuned(run_dir, task):
        return json.loads((Path(run_dir) / f"finetune-{task}" / "finetune.json").read_text())["metrics"]

    # every grid point: its score is the mean validation accuracy of its three fine-tunings; no test number is kept
    for entry in result["lr_grid"] + result["weight_grid"]:
        assert "test" not in entry
        assert entry["score"] == pytest.approx(statistics.fmean(finetuned(entry["run_dir"], t)["validation_accuracy"]
                                                                for t in TASKS))
        assert entry["validation_r1"] is not None  # the pre-training validation point
    assert len(result["lr_grid"]) == 2 * len(lrs)
    for variant in variants:
        grid = [e for e in result["lr_grid"] if e["variant"] == variant]
        assert result["chosen_lr"][variant] == max(grid, key=lambda e: e["score"])["lr"]  # ties: the first
    weights = [e for e in result["weight_grid"] if e["variant"] == "gc"]
    assert [e["multiplier"] for e in weights] == [0.5, 1.0] and {e["lr"] for e in weights} == {result["chosen_lr"]["gc"]}
    assert [e["weight"] for e in weights] == [0.5, 1.0]  # x the default weight of consistency, 1
    best = max(e["score"] for e in weights)
    default_first = sorted(weights, key=lambda e: e["multiplier"] != 1.0)
    # a tie keeps the default
    assert result["chosen_multiplier"]["gc"] == next(e["multiplier"] for e in default_first if e["score"] == best)
    assert result["chosen_multiplier"]["albef"] == 1.0
    rows = result["rows"]
    assert [(r["variant"], r["seed"]) for r in rows] == [(v, s) for v in variants for s in (0, 1)]
    for row in rows:  # the chosen settings, each number from the run's eval.json and finetune.json
        assert (row["lr"], row["multiplier"]) == (result["chosen_lr"][row["variant"]],
                                                  result["chosen_multiplier"][row["variant"]])
        metrics = json.loads((Path(row["run_dir"]) / "eval.json").read_text())["metrics"]
        assert row["test"]["text_retrieval_recall@1"] == metrics["text_retrieval_recall@1"]
        for task in TASKS:
            assert row["test"][task] == finetuned(row["run_dir"], task)["test_accuracy"]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        assert " | ".join(_cell([r["test"][k] for r in mine]) for k, _ in COLUMNS) + " |" in table
    assert (tmp_path / "fusion.png").read_bytes()[:4] == b"\x89PNG"
    # --reuse: nothing is trained again, the same table comes back
    assert run_fusion_experiment(tmp_path, seeds=2, workers=1, quick=True, variants=variants, reuse=True) == table
    again = json.loads((tmp_path / "results.json").read_text())
    assert all(e["reused"] for e in again["lr_grid"] + again["weight_grid"] + again["rows"])


def test_choices_read_validation_scores_only(tmp_path, monkeypatch):
    """Validation scores peak at one lr / weight, the test metrics at another: the choices follow the
    validation scores, and the same choices come back whatever the test metrics are."""
    lrs, multipliers = (1e-4, 2e-4, 4e-4), (0.5, 1.0, 2.0)
    best_lr = {"albef": 2e-4, "sep": 4e-4, "br": 1e-4, "gc": 1e-4}
    best_multiplier = {"sep": 2.0, "br": 1.0, "gc": 0.5}
    tags = {}

    def validation(variant, lr, multiplier, seed):
        return (0.5 + 0.1 * (lr == best_lr[variant]) + 0.05 * (multiplier == best_multiplier.get(variant, 1.0))
                + 0.01 * seed)

    def run(test_sign, until="seeds"):
        def test_value(t):  # the test metric: highest where validation is lowest (or, test_sign -1, the reverse)
            return 0.5 + test_sign * (0.6 - validation(*t))

        def fake_run_many(jobs, workers, reuse):
            runs = []
            for _, settings, t in jobs:
                run_dir = next(s.split("=", 1)[1] for s in settings if s.startswith("output_dir="))
                tags[run_dir] = t = (t["variant"], t["lr"], t["multiplier"], t["seed"])
                runs.append({"variant": t[0], "lr": t[1], "multiplier": t[2], "seed": t[3], "run_dir": run_dir, "seconds": 0.0,
                             "metrics": {key: test_value(t) for key, _ in COLUMNS[:2]}})
            return runs

        def fake_finetune(job, threads=1):
            t = tags[job[0]]
            return {"run_dir": job[0], "task": job[1], "validation_accuracy": validation(*t), "test_accuracy": test_value(t),
                    "seconds": 0.0, "reused": False}

        monkeypatch.setattr(fusion, "run_many", fake_run_many)
        monkeypatch.setattr(fusion, "_finetune_job", fake_finetune)
        monkeypatch.setattr(fusion, "_pretrain_validation",
                            lambda run_dir: {"validation_r1": 0.1, "validation_curve": [(1, 0.1)], "train_loss_last_tenth": 1.0})
        monkeypatch.setattr(fusion, "_plot", lambda result, path: None)
        out = tmp_path / f"sign{test_sign}-{until}"
        table = run_fusion_experiment(out, seeds=3, workers=1, lrs=lrs, weight_multipliers=multipliers, until=until)
        return json.loads((out / "results.json").read_text()), table

    result, table = run(+1)
    assert result["chosen_lr"] == best_lr
    assert result["chosen_multiplier"] == {"albef": 1.0, **best_multiplier}
    for variant in best_lr:  # the rows: 3 seeds at the chosen settings, their test metrics as measured
        mine = [r for r in result["rows"] if r["variant"] == variant]
        assert [r["seed"] for r in mine] == [0, 1, 2]
        assert {(r["lr"], r["multiplier"]) for r in mine} == {(best_lr[variant], best_multiplier.get(variant, 1.0))}
        assert all(r["test"]["vqa"] == pytest.approx(0.5 + 0.6 - r["score"]) for r in mine)
    assert len(result["lr_grid"]) == 4 * len(lrs) and len(result["weight_grid"]) == 3 * len(multipliers)
    flipped, _ = run(-1)
    assert (flipped["chosen_lr"], flipped["chosen_multiplier"]) == (result["chosen_lr"], result["chosen_multiplier"])
    assert [e["score"] for e in flipped["lr_grid"]] == [e["score"] for e in result["lr_grid"]]
    assert "| albef | 0.0002 | - |" in table and "| gc | 0.0001 | 0.5 |" in table
    for until, keys in (("lr", {"lr_grid", "chosen_lr"}),
                        ("weight", {"lr_grid", "chosen_lr", "weight_grid", "chosen_multiplier"})):
        partial, _ = run(+1, until)  # the sweep in pieces: each phase's grid and choice on disk
        assert keys <= set(partial) and "rows" not in partial and ("weight_grid" in partial) == (until == "weight")


def test_unknown_variant_or_phase_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown fusion variant"):
        run_fusion_experiment(tmp_path, variants=("albef", "clip"))
    with pytest.raises(ValueError, match="phase"):
        run_fusion_experiment(tmp_path, until="test")
    with pytest.raises(ValueError, match="must include 1"):
        run_fusion_experiment(tmp_path, weight_multipliers=(0.5, 2.0))
