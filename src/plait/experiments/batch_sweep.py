"""E2: small batch against large batch, by a fair protocol.

    plait experiment batch-sweep [--datasets emoji uci glyphs] [--budgets steps epochs]
                                 [--seeds 3] [--workers 2] [--reuse] [--quick] [key=value ...]

For every dataset, budget and cell (loss, B) -- InfoNCE at B in {32, 128, 512}, the gamma loss
at B in {8, 16, 32} (``CELLS``) -- the protocol is:

1. **Tune**: one run (seed 0) per learning rate of the grid ``lr_multipliers`` x the dataset's
   base lr x sqrt(B / 32), trained on the fit part of the training split and scored on the
   validation split carved from it (``data.validation_fraction``; the test split is never
   looked at while choosing). The best validation score picks the cell's lr. If it is the lowest
   or highest lr tried, one more run a grid step past that edge (x0.5 or x2) follows, up to
   ``MAX_EXTENSIONS`` times, so that the chosen lr is bracketed by worse ones.
2. **Seeds**: seeds 1 and 2 at the chosen lr; with the tuning run of seed 0 that is 3 seeds.
   Every run also evaluates the test split at its end, which is what the table reports.
3. **Budgets**, reported side by side: ``steps`` gives every run the same number of optimizer
   steps (``BUDGETS[dataset]["steps"]``); ``epochs`` the same number of epochs, enough that the
   largest batch takes at least 500 steps. The lr schedule spans each run's own budget.

Runs are single-threaded processes, ``--workers`` at a time; ``--reuse`` keeps every finished run
with the same settings, so the sweep can be run in pieces (one dataset or budget at a time) and
resumed. Writes ``results.json``, ``table.md`` and, per dataset and budget, ``curves-*.png``:
the validation metric against epoch (or step) of each cell at its chosen lr, mean +- std over seeds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from plait.atomic import atomic_write_text
from plait.experiments._runs import run_many
from plait.experiments._stats import difference, mean_std

CELLS: dict[str, tuple[int, ...]] = {"infonce": (32, 128, 512), "gamma": (8, 16, 32)}
LR_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0)
MAX_EXTENSIONS = 2  # grid steps a cell's lr search may go past the grid's edge
BASE_BATCH = 32
SEEDS = 3
VALIDATION_FRACTION = 0.1
# The selection metric of each dataset and what the table also shows (eval.json keys).
DATASETS = {
    "emoji": {"config": "emoji", "metric": "text_retrieval_recall@1", "also": ("image_retrieval_recall@1",),
              "tasks": "[retrieval]"},
    "uci": {"config": "uci", "metric": "lp_acc1", "also": (), "tasks": "[retrieval,linear_probe]"},
    "glyphs": {"config": "glyphs", "metric": "text_retrieval_recall@1", "also": ("image_retrieval_recall@1",),
               "tasks": "[retrieval]"},
}
# Equal steps for every run, or equal epochs (at least 500 steps at B = 512 on the fit split).
BUDGETS = {
    "emoji": {"steps": 800, "epochs": 100},
    "uci": {"steps": 1500, "epochs": 250},
    "glyphs": {"steps": 800, "epochs": 75},
}
EVALUATIONS_PER_RUN = 8
LABELS = {"text_retrieval_recall@1": "image -> text R@1", "image_retrieval_recall@1": "text -> image R@1",
          "lp_acc1": "linear probe"}
COLORS = {("infonce", 32): "#9ecae1", ("infonce", 128): "#4292c6", ("infonce", 512): "#08306b",
          ("gamma", 8): "#fcae91", ("gamma", 16): "#fb6a4a", ("gamma", 32): "#a50f15"}


def parse_cells(specs) -> dict[str, tuple[int, ...]]:
    """``["infonce:32,512", "gamma:32"]`` -> ``{"infonce": (32, 512), "gamma": (32,)}``: a subset of
    ``CELLS`` to run, so the sweep can be run a few cells at a time (``--cells``)."""
    cells: dict[str, list[int]] = {}
    for spec in specs:
        loss, sep, sizes = str(spec).partition(":")
        try:
            batch_sizes = [int(b) for b in sizes.split(",")] if sep else []
        except ValueError:
            batch_sizes = []
        if loss not in CELLS or not batch_sizes:
            raise ValueError(f"--cells {spec!r}: expected LOSS:B[,B...] with LOSS one of {sorted(CELLS)}, e.g. gamma:16,32")
        unknown = sorted(set(batch_sizes) - set(CELLS[loss]))
        if unknown:
            raise ValueError(f"--cells {spec!r}: {loss} is swept at B in {list(CELLS[loss])}, not {unknown}")
        cells[loss] = sorted(set(cells.get(loss, [])) | set(batch_sizes))
    return {loss: tuple(sizes) for loss, sizes in cells.items()}


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Square-root scaling from the config's B = 32 learning rate: the grid's centre at B."""
    return base_lr * math.sqrt(batch_size / BASE_BATCH)


def cell_settings(dataset: str, budget: str, loss: str, batch_size: int, multiplier: float, seed: int,
                   out: Path, base_lr: float, fit_size: int, quick: bool) -> tuple[Path, list[str]]:
    """(run directory, overrides) of one run of a cell: lr = ``multiplier`` x ``base_lr`` x sqrt(B / 32),
    the budget's steps or epochs (``fit_size`` training items per epoch), the validation carve and
    about ``EVALUATIONS_PER_RUN`` evaluations during training."""
    run_dir = out / dataset / budget / f"{loss}-b{batch_size}-lr{multiplier:g}-s{seed}"
    steps_per_epoch = fit_size // batch_size
    if budget == "steps":
        total = BUDGETS[dataset]["steps"]
        epochs = math.ceil(total / steps_per_epoch)
        schedule = [f"optim.steps={total}"]
    else:
        epochs = BUDGETS[dataset]["epochs"]
        schedule = [f"optim.epochs={epochs}"]
    spec = DATASETS[dataset]
    settings = [
        f"loss.name={loss}", f"data.batch_size={batch_size}", f"seed={seed}",
        f"optim.lr={scaled_lr(base_lr, batch_size) * multiplier}", *schedule,
        f"data.validation_fraction={VALIDATION_FRACTION}", "eval.split=test",
        f"train.eval_every_epochs={max(1, epochs // EVALUATIONS_PER_RUN)}",
        f"output_dir={run_dir}", f"name={dataset}-{budget}-{loss}-b{batch_size}-lr{multiplier:g}-s{seed}",
        "train.progress=false", "train.checkpoint_every_epochs=0", f"eval.tasks={spec['tasks']}", "eval.gallery=0",
    ]
    if quick:
        settings += ["optim.max_steps=3"]
    return run_dir, settings


def _validation_score(run_dir: Path, metric: str) -> float:
    """The last validation-split value of ``metric`` in the run's metrics.jsonl."""
    from plait.evaluate.curves import read_records

    values = [r[metric] for r in read_records(run_dir, strict=True) if r.get("split") == "validation" and metric in r]
    if not values:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no validation record of {metric}")
    return float(values[-1])


def fit_size(dataset: str, overrides) -> int:
    """The number of training items left after the validation carve (``VALIDATION_FRACTION``) of
    ``dataset``'s config with ``overrides``: the items one epoch trains on."""
    from plait.config import load_config
    from plait.data import build_dataset, carve_validation

    config = load_config(DATASETS[dataset]["config"], list(overrides))
    options = dict(config.data.options)
    train = build_dataset(config.data.name, split="train", **options)
    return len(carve_validation(train, VALIDATION_FRACTION, 0)[0])


def run_batch_sweep(out_dir, datasets=("emoji", "uci", "glyphs"), budgets=("steps", "epochs"), seeds: int = SEEDS,
                    quick: bool = False, workers: int = 2, overrides=(), reuse: bool = False, cells=None,
                    lr_multipliers=LR_MULTIPLIERS, max_extensions: int = MAX_EXTENSIONS) -> str:
    """Tune, then run the seeds, for every dataset x budget x cell; write and return the table.

    A cell whose best lr is an edge of the grid gets one more tuning run a grid step past that edge
    (x0.5 or x2), up to ``max_extensions`` times, so every chosen lr is bracketed by worse ones."""
    from plait.config import load_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(datasets) - set(DATASETS)) + sorted(set(budgets) - {"steps", "epochs"})
    if unknown:
        raise ValueError(f"unknown batch-sweep dataset or budget {unknown}; datasets: {sorted(DATASETS)}, budgets: steps, epochs")
    cells = cells or CELLS
    if max_extensions < 0:
        raise ValueError(f"--max-extensions={max_extensions} must be 0 or more")
    multipliers = tuple(lr_multipliers)[:2] if quick else tuple(lr_multipliers)
    seeds = 2 if quick else seeds
    started = time.perf_counter()
    results = []
    for dataset in datasets:
        spec = DATASETS[dataset]
        if dataset == "glyphs":
            _ensure_glyphs(load_config(spec["config"], list(overrides)))
        base_lr = load_config(spec["config"], list(overrides)).optim.lr
        fit = fit_size(dataset, overrides)
        for budget in budgets:
            def job(loss, b, m, seed):
                run_dir, settings = cell_settings(dataset, budget, loss, b, m, seed, out, base_lr, fit, quick)
                tags = {"dataset": dataset, "budget": budget, "loss": loss, "batch_size": b, "lr_multiplier": m, "seed": seed}
                return spec["config"], (*settings, *overrides), tags

            tuning = [job(loss, b, m, 0) for loss, sizes in cells.items() for b in sizes for m in multipliers]
            tuning.sort(key=lambda j: -j[2]["batch_size"])  # the longest runs first
            tuned = _scored(run_many(tuning, workers, reuse=reuse), spec["metric"])
            chosen = _choose(tuned)
            for _ in range(max_extensions if not quick else 0):
                extra = [job(loss, b, m, 0) for (loss, b), m in _edge_extensions(tuned, chosen).items()]
                if not extra:
                    break
                tuned += _scored(run_many(extra, workers, reuse=reuse), spec["metric"])
                chosen = _choose(tuned)
            seeded = [job(loss, b, chosen[(loss, b)]["lr_multiplier"], s) for (loss, b) in chosen for s in range(1, seeds)]
            seeded.sort(key=lambda j: -j[2]["batch_size"])
            finals = _scored(run_many(seeded, workers, reuse=reuse), spec["metric"])
            for run in tuned + finals:
                run["chosen"] = run["lr_multiplier"] == chosen[(run["loss"], run["batch_size"])]["lr_multiplier"]
                results.append(run)
            plot_curves(results, dataset, budget, out / f"curves-{dataset}-{budget}.png")
    result = {"cells": {k: list(v) for k, v in cells.items()}, "lr_multipliers": list(multipliers), "seeds": seeds,
              "budgets": BUDGETS, "seconds": time.perf_counter() - started, "runs": results}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    table = summary_table(result)
    atomic_write_text(out / "table.md", table)
    return table


def _choose(tuned: list[dict]) -> dict[tuple, dict]:
    """Each cell's tuning run with the best validation score (ties, common with R@1 on a few hundred
    items: the lower lr; runs finish in any order, so the order of ``tuned`` must not decide)."""
    chosen: dict[tuple, dict] = {}
    for run in tuned:
        key = (run["loss"], run["batch_size"])
        best = chosen.get(key)
        if best is None or (run["validation"], -run["lr_multiplier"]) > (best["validation"], -best["lr_multiplier"]):
            chosen[key] = run
    return chosen


def _edge_extensions(tuned: list[dict], chosen: dict[tuple, dict]) -> dict[tuple, float]:
    """The next multiplier (x0.5 below, x2 above) for every cell whose chosen lr is the lowest or
    the highest it was tried at: the grid is widened until the choice is inside it."""
    extra = {}
    for key, run in chosen.items():
        tried = _tried(tuned, loss=key[0], batch_size=key[1])
        if len(tried) < 2:
            continue
        if run["lr_multiplier"] == tried[0]:
            extra[key] = tried[0] / 2
        elif run["lr_multiplier"] == tried[-1]:
            extra[key] = tried[-1] * 2
    return extra


def _scored(runs: list[dict], metric: str) -> list[dict]:
    """``runs`` with each one's final validation ``metric`` set as ``run["validation"]``."""
    for run in runs:
        run["validation"] = _validation_score(Path(run["run_dir"]), metric)
    return runs


def _tried(runs: list[dict], **cell) -> list[float]:
    """The lr multipliers the tuning runs (seed 0) of the cell matching ``cell`` were trained at, sorted."""
    return sorted({r["lr_multiplier"] for r in runs if r["seed"] == 0 and all(r[k] == v for k, v in cell.items())})


def _ensure_glyphs(config) -> None:
    """Build the glyph CSV the config points at if it is not there yet."""
    from plait.data.builders import build_csv_dataset

    path = Path(config.data.options.path)
    if not path.is_file():
        build_csv_dataset("glyphs", path.parent)


def _chosen_cells(result: dict) -> dict[tuple, list[dict]]:
    cells: dict[tuple, list[dict]] = {}
    for run in result["runs"]:
        if run["chosen"]:
            cells.setdefault((run["dataset"], run["budget"], run["loss"], run["batch_size"]), []).append(run)
    return cells


def _fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f} +- {std:.1f}"


# The claims the protocol tests, as (gamma cell, InfoNCE cell, margin): gamma - InfoNCE >= margin points.
TARGETS = ((("gamma", 32), ("infonce", 32), 1.0), (("gamma", 32), ("infonce", 512), -0.5), (("gamma", 16), ("infonce", 128), 0.0))


def summary_table(result: dict) -> str:
    """Per dataset and budget: each cell's chosen lr, validation score and test metrics (mean +- std
    over seeds, %), then the targets with their verdicts."""
    cells = _chosen_cells(result)
    lines = []
    for dataset in [d for d in DATASETS if any(k[0] == d for k in cells)]:
        spec = DATASETS[dataset]
        keys = (spec["metric"], *spec["also"])
        for budget in ("steps", "epochs"):
            mine = {k[2:]: runs for k, runs in cells.items() if k[:2] == (dataset, budget)}
            if not mine:
                continue
            what = (f"{BUDGETS[dataset]['steps']} steps per run" if budget == "steps"
                    else f"{BUDGETS[dataset]['epochs']} epochs per run")
            lines += [f"**{dataset}, equal {budget}** ({what}; test split, %, mean +- std over seeds; "
                      "lr picked on validation)", "",
                      "| loss | B | lr (x sqrt(B/32) base) | validation " + LABELS[spec["metric"]] + " | "
                      + " | ".join(f"test {LABELS[k]}" for k in keys) + " | seeds |",
                      "|---|---|---|---|" + "---|" * len(keys) + "---|"]
            for (loss, b) in sorted(mine, key=lambda c: (c[0] != "infonce", c[1])):
                runs = mine[(loss, b)]
                tests = [_fmt([100 * r["metrics"][k] for r in runs]) for k in keys]
                lines.append(f"| {loss} | {b} | {runs[0]['lr_multiplier']:g} | {_fmt([100 * r['validation'] for r in runs])} | "
                             + " | ".join(tests) + f" | {len(runs)} |")
            lines.append("")
            lines += _grid_notes(result, dataset, budget, mine)
            for (g, i, margin) in TARGETS:
                if g in mine and i in mine:
                    gv = [100 * r["metrics"][spec["metric"]] for r in mine[g]]
                    iv = [100 * r["metrics"][spec["metric"]] for r in mine[i]]
                    delta = mean_std(gv)[0] - mean_std(iv)[0]
                    verdict = "met" if delta >= margin else "missed"
                    noise = f", standard error {difference(gv, iv).standard_error:.1f}" if min(len(gv), len(iv)) > 1 else ""
                    lines.append(f"- gamma B={g[1]} minus InfoNCE B={i[1]}: {delta:+.1f} points "
                                 f"(target >= {margin:+.1f}: {verdict}){noise}")
            lines.append("")
    return "\n".join(lines)


def _grid_notes(result: dict, dataset: str, budget: str, mine: dict) -> list[str]:
    """Which cells' lr search went past the grid, and which choices still sit on an edge of it."""
    base = set(result.get("lr_multipliers", LR_MULTIPLIERS))
    notes = []
    for (loss, b), runs in sorted(mine.items(), key=lambda c: (c[0][0] != "infonce", c[0][1])):
        tried = _tried(result["runs"], dataset=dataset, budget=budget, loss=loss, batch_size=b)
        extended = [m for m in tried if m not in base]
        edge = len(tried) > 1 and runs[0]["lr_multiplier"] in (tried[0], tried[-1])
        if extended or edge:
            what = f"grid widened to {', '.join(f'{m:g}' for m in extended)}" if extended else ""
            what += ("; " if what else "") + ("the choice is still the edge of what was tried" if edge else "bracketed")
            notes.append(f"- {loss} B={b}: lr tried {', '.join(f'{m:g}' for m in tried)} ({what})")
    return notes


def plot_curves(runs: list[dict], dataset: str, budget: str, path: Path) -> None:
    """The validation metric against epoch (equal epochs) or step (equal steps) of every cell at its
    chosen lr, mean +- std over seeds."""
    from plait.evaluate.curves import plot_metric_curves

    groups, colors = {}, {}
    for run in runs:
        if run["dataset"] == dataset and run["budget"] == budget and run.get("chosen"):
            label = f"{run['loss']} B={run['batch_size']}"
            groups.setdefault(label, []).append(Path(run["run_dir"]))
            colors[label] = COLORS.get((run["loss"], run["batch_size"]))
    if groups:
        metric = DATASETS[dataset]["metric"]
        plot_metric_curves(groups, metric, path, title=f"{dataset}, equal {budget}: validation {LABELS[metric]}",
                           ylabel=f"validation {LABELS[metric]} (%)", colors=colors,
                           x="step" if budget == "steps" else "epoch", split="validation")
