"""E5's quick mode: the table is the mean and spread of the runs' own result files."""

import json
import statistics

from plait.experiments.fusion import COLUMNS, TASKS, VARIANTS, run_fusion_experiment


def test_quick_fusion_experiment_table_matches_the_runs_files(tmp_path):
    table = run_fusion_experiment(tmp_path, seeds=2, workers=1, quick=True)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 2 * len(VARIANTS)
    for row in rows:  # each number comes from the run's eval.json and its fine-tuning's finetune.json
        run = tmp_path / f"{row['variant']}-s{row['seed']}"
        metrics = json.loads((run / "eval.json").read_text())["metrics"]
        assert row["text_retrieval_recall@1"] == metrics["text_retrieval_recall@1"]
        for task in TASKS:
            assert row[task] == json.loads((run / f"finetune-{task}" / "finetune.json").read_text())["metrics"]["test_accuracy"]
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        cells = [f"{100 * statistics.fmean(r[k] for r in mine):.1f} +- {100 * statistics.stdev([r[k] for r in mine]):.1f}"
                 for k, _ in COLUMNS]
        assert f"| {variant} | " + " | ".join(cells) + " |" in table
    assert (tmp_path / "fusion.png").read_bytes()[:4] == b"\x89PNG"
