"""The experiment summaries on hand-made results: what they compute and conclude."""

import math

from plait.experiments.batch_sweep import summary_table
from plait.experiments.information_gap import gap_tables
from plait.experiments.regularizers import regularizer_table


def _run(dataset, base, variant, seed, lp):
    return {"dataset": dataset, "base": base, "variant": variant, "seed": seed, "metrics": {"lp_acc1": lp}}


def test_regularizer_verdict_needs_one_point_beyond_the_spread():
    runs = [_run("uci", "infonce", "none", s, v) for s, v in enumerate((0.900, 0.905, 0.910))]
    runs += [_run("uci", "infonce", "gc", s, v) for s, v in enumerate((0.930, 0.935, 0.940))]  # +3.0, spread 0.5
    runs += [_run("uci", "infonce", "br", s, v) for s, v in enumerate((0.905, 0.915, 0.925))]  # +1.0, spread 1.0
    table = regularizer_table({"seeds": 3, "runs": runs})
    assert "| infonce | gc | 93.5 +- 0.5 |" in table
    assert "infonce + gc: linear probe +3.0 points" in table
    assert "infonce + br" not in table


def _sweep_run(loss, b, seed, value, validation, multiplier=1.0, chosen=True):
    return {"dataset": "uci", "budget": "steps", "loss": loss, "batch_size": b, "seed": seed, "lr_multiplier": multiplier,
            "chosen": chosen, "validation": validation, "metrics": {"lp_acc1": value, "text_retrieval_recall@1": value / 2}}


def test_batch_sweep_table_reports_chosen_cells_and_target_verdicts():
    runs = [_sweep_run("gamma", 32, s, v, 0.9) for s, v in enumerate((0.90, 0.92, 0.94))]
    runs += [_sweep_run("gamma", 32, 0, 0.99, 0.5, multiplier=2.0, chosen=False)]  # a rejected lr: not in the table
    runs += [_sweep_run("infonce", 32, s, v, 0.8) for s, v in enumerate((0.90, 0.91, 0.92))]
    runs += [_sweep_run("infonce", 512, s, v, 0.8, multiplier=0.5) for s, v in enumerate((0.91, 0.935))]
    table = summary_table({"runs": runs})
    assert "| gamma | 32 | 1 | 90.0 +- 0.0 | 92.0 +- 2.0 | 3 |" in table
    assert "| infonce | 512 | 0.5 | 80.0 +- 0.0 | 92.2 +- 1.8 | 2 |" in table
    assert "gamma B=32 minus InfoNCE B=32: +1.0 points (target >= +1.0: met)" in table
    assert "gamma B=32 minus InfoNCE B=512: -0.2 points (target >= -0.5: met)" in table
    assert "B=16" not in table  # no gamma B=16 cell: no verdict


def test_gap_table_reports_the_excess_against_the_bound():
    probe = lambda ce, acc: {"log_loss": ce, "acc1": acc}  # noqa: E731
    runs = [{"part": "synthetic", "private_bits": 2, "variant": "clip", "seed": 0,
             "probe": {"a": probe(1.0, 0.5), "b": probe(1.6, 0.25), "both": probe(1.5, 0.3)}}]
    references = {"synthetic-p2": {"a": probe(0.05, 0.99), "b": probe(1.4, 0.25), "both": probe(0.05, 0.99)}}
    table = gap_tables({"runs": runs, "references": references})
    assert f"| 2 | {2 * math.log(2):.3f} | 0.050 (99.0) |" in table
    # excess over the raw pair (0.05): probing [z_a, z_b] 1.5 - 0.05, probing z_b 1.6 - 0.05
    assert "| 1.450 | 1.550 |\n" in table


def test_main_job_table_tests_each_difference_against_the_seed_noise():
    from plait.experiments.small_batch import comparison_table

    def cell(values):
        return [{"metrics": {"text_retrieval_recall@1": v / 100, "image_retrieval_recall@1": 0.1, "text_retrieval_recall@5": 0.2}}
                for v in values]

    table = comparison_table({("gamma", 32): cell([8.0, 9.0, 10.0]), ("infonce", 32): cell([7.0, 7.5, 8.0, 8.5]),
                              ("infonce", 128): cell([18.0, 19.0, 20.0])})
    # +1.25 with standard error sqrt(1/3 + 5/48) = 0.66 (test_stats checks Welch's p by hand)
    assert "- gamma B=32 minus infonce B=32, image->text R@1: +1.2 points +- 0.7 (standard error), Welch p = " in table
    assert "within the seed noise; about 6 seeds per cell would resolve" in table
    assert "- gamma B=32 minus infonce B=128, image->text R@1: -10.0 points +- 0.8 (standard error)" in table
    assert table.count("beyond the seed noise") == 1
