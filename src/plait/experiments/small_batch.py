"""The main job: on emoji, the decomposable loss at a small batch against InfoNCE at the same batch
and at a 4x larger one, by the fair protocol of E2 reduced to fit in minutes.

    plait experiment small-batch [--quick] [--out runs/small-batch] [--workers 2] [key=value ...]

Every run gets the same number of optimizer steps (E2's emoji budget), the learning rate its cell
was given by E2's validation-split tuning (``TUNED_LR_MULTIPLIER``, from
``plait experiment batch-sweep --datasets emoji --budgets steps``), and ``SEEDS`` seeds; the
table shows the test split's R@1 as mean +- std over seeds and each difference with Welch's test.
"""

from __future__ import annotations

from pathlib import Path

from plait.atomic import atomic_write_text
from plait.experiments._runs import run_many
from plait.experiments._stats import difference, mean_std
from plait.experiments.batch_sweep import BUDGETS, cell_settings, fit_size

RUNS = (("gamma", 32), ("infonce", 32), ("infonce", 128))
# lr multiplier (x the config's lr x sqrt(B/32)) that E2's tuning chose for each cell, equal steps.
TUNED_LR_MULTIPLIER = {("gamma", 32): 0.125, ("infonce", 32): 0.25, ("infonce", 128): 0.5}
SEEDS = 3
KEYS = ("text_retrieval_recall@1", "image_retrieval_recall@1", "text_retrieval_recall@5")
LABELS = {"text_retrieval_recall@1": "image->text R@1", "image_retrieval_recall@1": "text->image R@1",
          "text_retrieval_recall@5": "image->text R@5"}


def run_small_batch(out_dir: str | Path, quick: bool = False, overrides=(), workers: int = 2, seeds: int = SEEDS,
                    threads: int = 1) -> str:
    """Train every (loss, B) of ``RUNS`` for ``seeds`` seeds, ``workers`` runs at a time with ``threads``
    torch threads each (another thread count changes the float reduction order, as another CPU does)."""
    from plait.config import load_config
    from plait.evaluate.curves import plot_metric_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_lr = load_config("emoji", list(overrides)).optim.lr
    fit = fit_size("emoji", overrides)
    seeds = 1 if quick else seeds
    jobs = []
    for loss, b in RUNS:
        for seed in range(seeds):
            run_dir, settings = cell_settings("emoji", "steps", loss, b, TUNED_LR_MULTIPLIER[(loss, b)], seed, out,
                                               base_lr, fit, quick)
            jobs.append(("emoji", (*settings, *overrides), {"loss": loss, "batch_size": b, "seed": seed}))
    jobs.sort(key=lambda job: -job[2]["batch_size"])
    runs = run_many(jobs, workers, threads=threads)
    cells: dict[tuple, list[dict]] = {}
    for run in runs:
        cells.setdefault((run["loss"], run["batch_size"]), []).append(run)
    table = comparison_table(cells)
    groups = {f"{loss} B={b}": [Path(r["run_dir"]) for r in cells[(loss, b)]] for loss, b in RUNS}
    plot_metric_curves(groups, "text_retrieval_recall@1", out / "curves.png", x="step", split="validation",
                       title="emoji, equal steps: validation image -> text R@1", ylabel="validation image -> text R@1 (%)")
    steps = BUDGETS["emoji"]["steps"] if not quick else 3
    lines = ["# Small batch, decomposable loss vs InfoNCE (emoji)", "",
             "`plait experiment small-batch`" + (" --quick" if quick else ""), "",
             f"{steps} optimizer steps per run, lr tuned on the validation split by E2, {seeds} seed(s); test split "
             f"({len(runs)} runs). ![curves](curves.png)", "", table]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return table


def comparison_table(cells: dict[tuple, list[dict]]) -> str:
    """One row per (loss, B): each metric as mean +- std over seeds (%), then the gamma cell's
    difference to each InfoNCE cell on the first metric, with its standard error and Welch's test
    (``_stats.difference``)."""
    lines = ["| loss | B | " + " | ".join(LABELS[k] for k in KEYS) + " | seeds |", "|---|---|" + "---|" * len(KEYS) + "---|"]
    for (loss, b) in RUNS:
        runs = cells.get((loss, b), [])
        if not runs:
            continue
        stats = ["{:.1f} +- {:.1f}".format(*mean_std([100 * r["metrics"][k] for r in runs])) for k in KEYS]
        lines.append(f"| {loss} | {b} | " + " | ".join(stats) + f" | {len(runs)} |")
    gamma = cells.get(RUNS[0])
    lines.append("")
    for other in RUNS[1:]:
        if gamma and cells.get(other):
            g = [100 * r["metrics"][KEYS[0]] for r in gamma]
            o = [100 * r["metrics"][KEYS[0]] for r in cells[other]]
            head = f"- gamma B={RUNS[0][1]} minus {other[0]} B={other[1]}, {LABELS[KEYS[0]]}: "
            if min(len(g), len(o)) < 2:
                lines.append(head + f"{mean_std(g)[0] - mean_std(o)[0]:+.1f} points (one seed: no test)")
            else:
                lines.append(head + difference(g, o).describe())
    return "\n".join(lines)
