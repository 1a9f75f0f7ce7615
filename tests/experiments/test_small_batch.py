"""The main job and the E2 protocol's run settings: what they train and what they print."""

import json
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
