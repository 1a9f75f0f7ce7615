"""E5: the ALBEF-style fusion model with the structure regularisers, on the three emoji tasks, tuned.

    plait experiment fusion [--seeds 3] [--workers 1] [--reuse] [--quick]

Every variant (ALBEF alone, +Sep, +Br, +GC, the regulariser on the ITC features with the momentum
features as the augmented ones) is one *setting* (pre-training lr, regulariser weight, seed), and a
setting is scored as: pre-train ``configs/fusion.yaml`` on emoji's training split minus a
validation tenth carved by base emoji (``data.validation_fraction``) for ``PRETRAIN_STEPS``
optimizer steps, the same for every setting (retrieval on the carved emoji every
``EVAL_EVERY_EPOCHS`` epochs: the pre-training validation curve); then fine-tune a task head on
VQA, visual reasoning and visual entailment (``plait.finetune`` with ``FINETUNE``; it carves its
own validation tenth of each task by base emoji) and take the **validation score**: the mean of
the three tasks' validation accuracies. The protocol:

1. **lr**: seed 0, every variant at every lr of ``LRS`` (each regulariser at its default weight,
   ``DEFAULT_WEIGHTS``); the best validation score picks the variant's lr.
2. **weight**: seed 0, every regulariser at its chosen lr and each multiplier of
   ``WEIGHT_MULTIPLIERS`` x its default weight (x1 is the lr phase's run); the best validation
   score picks the weight (a tie keeps the default).
3. **seeds**: seeds 1 .. seeds-1 at the chosen (lr, weight); with the seed-0 run, the table.

Choices read the validation score only (``choose``); ties go to the earlier grid point. The test
split (828 emoji whose base emoji are in neither pre-training nor fine-tuning) is scored by every
run, but the table and ``results.json`` report it for the chosen settings only (mean +- std over
seeds). ``--reuse`` keeps every finished pre-training of the same config (``_runs.run_many``) and
every finished fine-tuning of the same settings on those weights, so the sweep runs in pieces
(``until="lr"`` / ``"weight"`` stop after a phase). Writes ``results.json`` (every phase's grid
scores and choices), ``table.md`` and ``fusion.png``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import statistics
import time
from pathlib import Path

from plait.atomic import atomic_write_text, save_figure
from plait.experiments._runs import run_many
from plait.experiments._stats import mean_std
from plait.losses.regularizers import DEFAULT_WEIGHTS

VARIANTS = {"albef": None, "sep": "separation", "br": "bridge", "gc": "consistency"}  # variant -> its regulariser
TASKS = ("vqa", "reasoning", "entailment")
# the pre-training lr grid (configs/fusion.yaml: 5e-4), widened while the choice sat on its upper edge
LRS = (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)
WEIGHT_MULTIPLIERS = (0.5, 1.0, 2.0)  # x the regulariser's default weight
PRETRAIN_STEPS = 1500
VALIDATION_FRACTION = 0.1
EVAL_EVERY_EPOCHS = 3  # the pre-training validation curve (about 83 steps an epoch on the fit split)
FINETUNE = ("epochs=3", "batch_size=32", "lr=2e-4")
PHASES = ("lr", "weight", "seeds")
COLUMNS = [("text_retrieval_recall@1", "image->text R@1"), ("image_retrieval_recall@1", "text->image R@1"),
           ("vqa", "VQA"), ("reasoning", "reasoning"), ("entailment", "entailment")]
QUICK = {"lrs": 2, "weight_multipliers": (0.5, 1.0)}  # --quick: the first two lrs, one extra weight


def regularizers(variant: str, multiplier: float = 1.0) -> str:
    """The ``regularizers=`` value of ``variant`` at ``multiplier`` x its regulariser's default weight."""
    name = VARIANTS[variant]
    return "[]" if name is None else f"[{{name: {name}, weight: {DEFAULT_WEIGHTS[name] * multiplier:g}}}]"


def _run_name(variant: str, lr: float, multiplier: float, seed: int) -> str:
    return f"{variant}-lr{lr:g}-w{multiplier:g}-s{seed}"


def _pretrain_job(variant: str, lr: float, multiplier: float, seed: int, out: Path, quick: bool,
                  steps: int = PRETRAIN_STEPS) -> tuple[str, tuple[str, ...], dict]:
    name = _run_name(variant, lr, multiplier, seed)
    settings = [f"regularizers={regularizers(variant, multiplier)}", f"optim.lr={lr:g}", f"seed={seed}",
                f"output_dir={out / name}", f"name=fusion-{name}", f"optim.steps={steps}",
                f"data.validation_fraction={VALIDATION_FRACTION}", "eval.split=test",
                f"train.eval_every_epochs={EVAL_EVERY_EPOCHS}", "train.progress=false", "train.checkpoint_every_epochs=0",
                "eval.gallery=0", "eval.tasks=[retrieval]"]
    if quick:
        settings += ["optim.max_steps=2", "data.options.image_size=16", "model.fusion.image_size=16",
                     "model.fusion.queue_size=64"]
    return "fusion", tuple(settings), {"variant": variant, "lr": lr, "multiplier": multiplier, "seed": seed}


def _finetune_settings(task: str, seed: int, out: Path, quick: bool) -> list[str]:
    small = "task_options={pairs: 60}" if task == "reasoning" else "task_options={per_image: 0.1}"
    return [*FINETUNE, f"seed={seed}", f"output_dir={out}"] + (["max_steps=2", small, "batch_size=8"] if quick else [])


def _finished_finetune(out: Path, weights: Path, task: str, settings: list[str]) -> dict | None:
    """The metrics of a finished fine-tuning in ``out`` with the same settings, newer than ``weights``; else None."""
    from omegaconf import OmegaConf

    from plait.finetune import finetune_config

    path = out / "finetune.json"
    if not (path.is_file() and weights.is_file() and path.stat().st_mtime >= weights.stat().st_mtime):
        return None
    result = json.loads(path.read_text(encoding="utf-8"))
    if result.get("config") != OmegaConf.to_container(finetune_config(task, settings)):
        return None
    return result["metrics"]


def _finetune_job(job: tuple[str, str, int, bool, bool], threads: int = 1) -> dict:
    """Fine-tune ``run_dir``'s weights on ``task``; with ``reuse`` a finished fine-tuning of the same
    settings on the same weights is read back instead."""
    import torch

    from plait.finetune import finetune

    run_dir, task, seed, quick, reuse = job
    torch.set_num_threads(threads)
    out = Path(run_dir) / f"finetune-{task}"
    settings = _finetune_settings(task, seed, out, quick)
    weights = Path(run_dir) / "model.safetensors"
    start = time.perf_counter()
    metrics = _finished_finetune(out, weights, task, settings) if reuse else None
    reused = metrics is not None
    if metrics is None:
        metrics = finetune(weights, task, settings)["metrics"]
    return {"run_dir": run_dir, "task": task, "test_accuracy": metrics["test_accuracy"],
            "validation_accuracy": metrics["validation_accuracy"], "seconds": time.perf_counter() - start, "reused": reused}


def _pretrain_validation(run_dir: Path) -> dict:
    """The pre-training validation curve (image->text R@1 on the carved emoji against step) and its last point."""
    from plait.evaluate.curves import read_records

    curve = [(r["step"], r["text_retrieval_recall@1"]) for r in read_records(run_dir, strict=True)
             if r.get("split") == "validation" and "text_retrieval_recall@1" in r]
    losses = [r["loss"] for r in read_records(run_dir) if "loss" in r and "split" not in r]
    tail = losses[-len(losses) // 10:] if losses else []
    return {"validation_r1": curve[-1][1] if curve else None, "validation_curve": curve,
            "train_loss_last_tenth": statistics.fmean(tail) if tail else None}


def evaluate_settings(settings: list[tuple[str, float, float, int]], out: Path, workers: int, reuse: bool, quick: bool,
                      steps: int = PRETRAIN_STEPS) -> list[dict]:
    """Pre-train and fine-tune every (variant, lr, multiplier, seed); one record each, with the
    validation score (``score``: mean validation accuracy over ``TASKS``) apart from the test metrics (``test``)."""
    jobs = [_pretrain_job(*s, out, quick, steps) for s in settings]
    pretrained = {(r["variant"], r["lr"], r["multiplier"], r["seed"]): r for r in run_many(jobs, workers=workers, reuse=reuse)}
    retrained = {r["run_dir"] for r in pretrained.values() if not r.get("reused")}
    tune_jobs = [(pretrained[s]["run_dir"], task, s[3], quick, reuse and pretrained[s]["run_dir"] not in retrained)
                 for s in settings for task in TASKS]
    if workers <= 1:
        tuned = [_finetune_job(job) for job in tune_jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            tuned = list(pool.imap_unordered(functools.partial(_finetune_job, threads=1), tune_jobs))
    by_task = {(t["run_dir"], t["task"]): t for t in tuned}
    records = []
    for s in settings:
        run = pretrained[s]
        validation = {task: by_task[(run["run_dir"], task)]["validation_accuracy"] for task in TASKS}
        records.append({"variant": s[0], "lr": s[1], "multiplier": s[2], "seed": s[3], "run_dir": run["run_dir"],
                        "weight": DEFAULT_WEIGHTS[VARIANTS[s[0]]] * s[2] if VARIANTS[s[0]] else None,
                        "score": statistics.fmean(validation.values()), "validation": validation,
                        **_pretrain_validation(Path(run["run_dir"])),
                        "test": {**{key: run["metrics"][key] for key, _ in COLUMNS[:2]},
                                 **{task: by_task[(run["run_dir"], task)]["test_accuracy"] for task in TASKS}},
                        "seconds": run["seconds"] + sum(by_task[(run["run_dir"], task)]["seconds"] for task in TASKS),
                        "reused": bool(run.get("reused")) and all(by_task[(run["run_dir"], t)]["reused"] for t in TASKS)})
    return records


def choose(records: list[dict], key: str) -> dict:
    """The record with the best validation ``score`` per ``variant`` -> its ``key`` (lr or multiplier);
    ties go to the first in ``records``. Reads nothing but ``variant``, ``score`` and ``key``."""
    best: dict[str, dict] = {}
    for record in records:
        if record["variant"] not in best or record["score"] > best[record["variant"]]["score"]:
            best[record["variant"]] = record
    return {variant: record[key] for variant, record in best.items()}


def _grid_entry(record: dict) -> dict:
    """A grid point as results.json keeps it: validation scores only (the test split is reported for chosen settings only)."""
    return {k: record[k] for k in ("variant", "lr", "multiplier", "weight", "seed", "run_dir", "score", "validation",
                                   "validation_r1", "train_loss_last_tenth", "seconds", "reused")}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    mean, spread = mean_std(values)
    return f"{100 * mean:.1f} +- {100 * spread:.1f}"


def run_fusion_experiment(out: str | Path = "runs/fusion-tuned", seeds: int = 3, workers: int = 1, reuse: bool = False,
                          quick: bool = False, lrs: tuple[float, ...] = LRS,
                          weight_multipliers: tuple[float, ...] = WEIGHT_MULTIPLIERS, variants: tuple[str, ...] = tuple(VARIANTS),
                          steps: int = PRETRAIN_STEPS, until: str = "seeds") -> str:
    """The tuned E5 (module docstring): lr phase, weight phase, seeds; returns the table (or, with
    ``until`` "lr" / "weight", the grid so far)."""
    out = Path(out)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or until not in PHASES:
        raise ValueError(f"unknown fusion variant(s) {unknown} or phase {until!r}; "
                         f"variants: {list(VARIANTS)}, phases: {list(PHASES)}")
    if 1.0 not in weight_multipliers:
        raise ValueError(f"weight_multipliers must include 1 (the default weight the lr phase uses), got {weight_multipliers}")
    if quick:
        lrs, weight_multipliers = tuple(lrs)[:QUICK["lrs"]], QUICK["weight_multipliers"]
    start = time.perf_counter()
    result: dict = {"protocol": {"variants": {v: VARIANTS[v] for v in variants}, "lrs": list(lrs),
                                 "weight_multipliers": list(weight_multipliers), "default_weights": dict(DEFAULT_WEIGHTS),
                                 "pretrain_steps": 2 if quick else steps, "validation_fraction": VALIDATION_FRACTION,
                                 "finetune": list(FINETUNE), "seeds": seeds, "quick": quick,
                                 "score": "mean validation accuracy over " + ", ".join(TASKS)}}

    def save(table: str) -> str:
        result["seconds"] = time.perf_counter() - start
        atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
        atomic_write_text(out / "table.md", table)
        return table

    lr_runs = evaluate_settings([(v, lr, 1.0, 0) for v in variants for lr in lrs], out, workers, reuse, quick, steps)
    chosen_lr = choose(lr_runs, "lr")
    result["lr_grid"], result["chosen_lr"] = [_grid_entry(r) for r in lr_runs], chosen_lr
    table = save(grid_table(result))  # each phase is on disk as soon as it is done
    if until == "lr":
        return table
    regularised = [v for v in variants if VARIANTS[v]]
    weight_runs = evaluate_settings([(v, chosen_lr[v], m, 0) for v in regularised for m in weight_multipliers if m != 1.0],
                                    out, workers, reuse, quick, steps)
    at_default = [r for r in lr_runs if r["variant"] in regularised and r["lr"] == chosen_lr[r["variant"]]]
    # the default weight first, so that a tie keeps it
    chosen_multiplier = {v: 1.0 for v in variants if not VARIANTS[v]} | choose(at_default + weight_runs, "multiplier")
    weight_grid = sorted(at_default + weight_runs, key=lambda r: (variants.index(r["variant"]), r["multiplier"]))
    result["weight_grid"], result["chosen_multiplier"] = [_grid_entry(r) for r in weight_grid], chosen_multiplier
    table = save(grid_table(result))
    if until == "weight":
        return table
    seed0 = {(r["variant"], r["lr"], r["multiplier"]): r for r in lr_runs + weight_runs}
    more = evaluate_settings([(v, chosen_lr[v], chosen_multiplier[v], s) for v in variants for s in range(1, seeds)],
                             out, workers, reuse, quick, steps)
    rows = [seed0[(v, chosen_lr[v], chosen_multiplier[v])] for v in variants] + more
    rows.sort(key=lambda r: (variants.index(r["variant"]), r["seed"]))
    result["rows"] = rows
    table = summary_table(result) + "\n" + grid_table(result)
    _plot(result, out / "fusion.png")
    return save(table)


def summary_table(result: dict) -> str:
    """The chosen settings per variant and their test metrics, mean +- std over seeds (%)."""
    protocol, rows = result["protocol"], result["rows"]
    variants = list(protocol["variants"])
    seeds = sorted({r["seed"] for r in rows})
    grid = ", ".join(f"{lr:g}" for lr in protocol["lrs"])
    multipliers = ", ".join(f"{m:g}" for m in protocol["weight_multipliers"])
    lines = [f"E5 on emoji, tuned: fusion pre-training ({protocol['pretrain_steps']} steps, lr from {{{grid}}}, "
             f"weight from {{{multipliers}}} x default) then fine-tuning ({', '.join(protocol['finetune'])}); "
             f"settings chosen on the validation score (mean validation accuracy of the three tasks, seed 0); "
             f"test split, %, mean +- std over seeds {seeds}", "",
             "| variant | lr | weight | validation score | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 4) + "|"]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        weight = "-" if mine[0]["weight"] is None else f"{mine[0]['weight']:g}"
        lines.append(f"| {variant} | {mine[0]['lr']:g} | {weight} | {_mean_std([r['score'] for r in mine])} | "
                     + " | ".join(_mean_std([r["test"][key] for r in mine]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def grid_table(result: dict) -> str:
    """The validation scores of every grid point (seed 0, %): lr phase, then weight phase; * = chosen."""
    protocol = result["protocol"]
    lines = ["Validation score (mean validation accuracy of VQA, reasoning, entailment, %; seed 0) and, in brackets, "
             "pre-training validation image->text R@1; * = chosen", "",
             "| variant | " + " | ".join(f"lr {lr:g}" for lr in protocol["lrs"]) + " |",
             "|---" * (len(protocol["lrs"]) + 1) + "|"]

    def cell(record: dict, chosen: bool) -> str:
        r1 = "-" if record["validation_r1"] is None else f"{100 * record['validation_r1']:.1f}"
        return f"{100 * record['score']:.1f} ({r1}){' *' if chosen else ''}"

    for variant in protocol["variants"]:
        mine = {r["lr"]: r for r in result["lr_grid"] if r["variant"] == variant}
        lines.append(f"| {variant} | "
                     + " | ".join(cell(mine[lr], lr == result["chosen_lr"][variant]) for lr in protocol["lrs"]) + " |")
    if "weight_grid" in result:
        multipliers = protocol["weight_multipliers"]
        lines += ["", "| variant (at its lr) | " + " | ".join(f"x{m:g} default" for m in multipliers) + " |",
                  "|---" * (len(multipliers) + 1) + "|"]
        for variant in protocol["variants"]:
            mine = {r["multiplier"]: r for r in result["weight_grid"] if r["variant"] == variant}
            if mine:
                lines.append(f"| {variant} (lr {result['chosen_lr'][variant]:g}) | " + " | ".join(
                    f"w {mine[m]['weight']:g}: " + cell(mine[m], m == result["chosen_multiplier"][variant])
                    for m in multipliers) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    """Three panels: the lr grid's validation scores, the pre-training validation curves at the chosen
    settings (mean over seeds), and the test metrics at the chosen settings (mean +- std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, rows = list(result["protocol"]["variants"]), result["rows"]
    figure, (grid_ax, curve_ax, bar_ax) = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [1, 1, 2]})
    colors = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for variant in variants:
        mine = sorted((r["lr"], 100 * r["score"]) for r in result["lr_grid"] if r["variant"] == variant)
        grid_ax.plot([lr for lr, _ in mine], [s for _, s in mine], "o-", color=colors[variant], label=variant)
        grid_ax.plot([result["chosen_lr"][variant]], [dict(mine)[result["chosen_lr"][variant]]], "*", color=colors[variant],
                     markersize=14)
        curves = [r["validation_curve"] for r in rows if r["variant"] == variant and r["validation_curve"]]
        if curves:
            steps = [step for step, _ in curves[0]]
            means = [100 * statistics.fmean(c[i][1] for c in curves if len(c) > i) for i in range(len(steps))]
            curve_ax.plot(steps, means, "o-", color=colors[variant], markersize=3, label=variant)
    grid_ax.set_xscale("log")
    grid_ax.set_xticks(result["protocol"]["lrs"], [f"{lr:g}" for lr in result["protocol"]["lrs"]])
    grid_ax.minorticks_off()
    grid_ax.set_title("lr grid (star: chosen)", fontsize=9)
    grid_ax.set_xlabel("pre-training lr (seed 0, default weight)")
    grid_ax.set_ylabel("validation score (%)")
    grid_ax.legend(fontsize=8)
    curve_ax.set_xlabel("pre-training step")
    curve_ax.set_ylabel("validation image->text R@1 (%)")
    curve_ax.set_title("chosen settings, mean over seeds", fontsize=9)
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        mine = [r for r in rows if r["variant"] == variant]
        means, spreads = zip(*(tuple(100 * v for v in mean_std(r["test"][key] for r in mine)) for key, _ in COLUMNS))
        bar_ax.bar([i + k * width for i in range(len(COLUMNS))], means, width, yerr=spreads, color=colors[variant],
                   label=variant, capsize=2)
    bar_ax.set_xticks([i + 0.4 - width / 2 for i in range(len(COLUMNS))],
                      [label.replace(" R@1", "\nR@1") for _, label in COLUMNS])
    bar_ax.set_ylabel("test % (chosen settings)")
    bar_ax.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
