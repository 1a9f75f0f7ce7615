"""The main job and the E2 protocol's run settings: what they train and what they print."""

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from plait.config import load_config
from plait.experiments.batch_sweep import BUDGETS, cell_settings, scaled_lr
from plait.experiments.small_batch import RUNS, run_small_batch


def test_main_job_quick_table_matches_the_runs_eval_files(tmp_path):
    table = run_small_batch(tmp_path, quick=True, workers=1)
    header = table.splitlines()[0]
    assert header == "| loss | B | image->text R@1 | text->image R@1 | image->text R@5 | seeds |"  # no repeated column
    for loss, b in RUNS:
        runs = sorted(tmp_path.glob(f"emoji/steps/{loss}-b{b}-lr*-s*"))
        values = [100 * json.loads((run / "eval.json").read_text())["metrics"]["text_retrieval_recall@1"] for run in runs]
        assert len(values) == 1
        assert f"| {loss} | {b} | {statistics.fmean(values):.1f} +- 0.0 |" in table
        assert json.loads((runs[0] / "eval.json").read_text())["split"] == "test"
    assert (tmp_path / "report.md").is_file() and (tmp_path / "curves.png").is_file()


def _settings(budget, b, multiplier=2.0):
    run_dir, settings = cell_settings("emoji", budget, "gamma", b, multiplier, 1, Path("/x"), 2e-3, 2800, quick=False)
    return run_dir, load_config("emoji", settings)


def test_protocol_settings_equal_steps_and_equal_epochs():
    run_dir, config = _settings("steps", 512)
    assert run_dir == Path("/x/emoji/steps/gamma-b512-lr2-s1")
    assert config.optim.steps == BUDGETS["emoji"]["steps"] and config.data.batch_size == 512 and config.seed == 1
    assert config.optim.lr == 2.0 * scaled_lr(2e-3, 512) == 2.0 * 2e-3 * 4
    assert config.data.validation_fraction == 0.1 and config.eval.split == "test"
    # 800 steps at 5 steps per epoch (2800 // 512) is 160 epochs: about 8 evaluations on the validation split
    assert config.train.eval_every_epochs == 160 // 8
    _, config = _settings("epochs", 512)
    assert config.optim.steps is None and config.optim.epochs == BUDGETS["emoji"]["epochs"]
    assert BUDGETS["emoji"]["epochs"] * (2800 // 512) >= 500  # the largest batch takes at least 500 steps


def test_cells_option_selects_a_subset_and_names_a_bad_spec():
    from plait.experiments.batch_sweep import parse_cells

    assert parse_cells(["infonce:512,32", "gamma:32", "infonce:128"]) == {"infonce": (32, 128, 512), "gamma": (32,)}
    for bad, says in (("gamma", "LOSS:B"), ("sogclr:32", "LOSS:B"), ("gamma:x", "LOSS:B"), ("gamma:64", "not [64]")):
        with pytest.raises(ValueError, match=f"--cells {re.escape(repr(bad))}.*{re.escape(says)}"):
            parse_cells([bad])


def test_sweep_widens_the_lr_grid_past_an_edge_until_the_choice_is_bracketed(tmp_path, monkeypatch):
    """The protocol's logic with the training replaced by a validation score that peaks at lr x4 for
    InfoNCE B=32 and halfway (in log lr) between x0.5 and x1 for gamma B=32: the first is widened to
    4 (chosen) and 8 (worse); the second stays inside the grid, its tie going to the lower lr, 0.5;
    seeds 1-2 run at the choice."""
    import plait.experiments.batch_sweep as sweep

    peak = {("infonce", 32): 4.0, ("gamma", 32): 2**-0.5}
    launched = []

    def fake_run_many(jobs, workers, reuse=False):
        runs = []
        for _, settings, tags in jobs:
            launched.append((tags["loss"], tags["lr_multiplier"], tags["seed"]))
            run_dir = next(s.split("=", 1)[1] for s in settings if s.startswith("output_dir="))
            runs.append({**tags, "run_dir": run_dir,
                         "metrics": {"text_retrieval_recall@1": 0.1, "image_retrieval_recall@1": 0.1}})
        return runs

    def fake_score(run_dir, metric):
        loss, b, lr = Path(run_dir).name.split("-")[:3]
        distance = abs(math.log2(float(lr[2:])) - math.log2(peak[(loss, int(b[1:]))]))
        return 0.5 - 0.01 * distance

    monkeypatch.setattr(sweep, "run_many", fake_run_many)
    monkeypatch.setattr(sweep, "_validation_score", fake_score)
    monkeypatch.setattr(sweep, "fit_size", lambda dataset, overrides: 2800)
    monkeypatch.setattr(sweep, "plot_curves", lambda *args: None)
    table = sweep.run_batch_sweep(tmp_path, datasets=("emoji",), budgets=("steps",), workers=1,
                                  cells={"infonce": (32,), "gamma": (32,)})
    def tried(loss):
        return sorted(m for name, m, s in launched if name == loss and s == 0)

    assert tried("infonce") == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert tried("gamma") == [0.25, 0.5, 1.0, 2.0]
    assert sorted((name, m) for name, m, s in launched if s > 0) == [("gamma", 0.5)] * 2 + [("infonce", 4.0)] * 2
    assert "- infonce B=32: lr tried 0.25, 0.5, 1, 2, 4, 8 (grid widened to 4, 8; bracketed)" in table
    assert "gamma B=32: lr tried" not in table  # inside the grid: no note
    with pytest.raises(ValueError, match="--max-extensions=-1 must be 0 or more"):
        sweep.run_batch_sweep(tmp_path, datasets=("emoji",), budgets=("steps",), max_extensions=-1)
