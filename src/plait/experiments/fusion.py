"""E5: the ALBEF-style fusion model with the structure regularisers, on the three emoji tasks.

    plait experiment fusion [--seeds 3] [--workers 2] [--reuse] [--quick]

For each variant (ALBEF alone, +Sep, +Br, +GC; each regulariser at its default weight, on the
ITC features with the momentum features as the augmented ones) and seed: pre-train
``configs/fusion.yaml`` on emoji for ``PRETRAIN_STEPS`` optimizer steps (retrieval on the test
emoji), then fine-tune a task head on VQA, visual reasoning and visual entailment
(``plait.finetune``, ``FINETUNE`` settings, validation tenth carved by base emoji) and score the
test split. Table: mean +- std over seeds; ``results.json``, ``table.md`` and ``fusion.png``.
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

VARIANTS = {
    "albef": "[]",
    "sep": "[{name: separation}]",
    "br": "[{name: bridge}]",
    "gc": "[{name: consistency}]",
}
TASKS = ("vqa", "reasoning", "entailment")
PRETRAIN_STEPS = 1000
FINETUNE = ("epochs=3", "batch_size=32", "lr=2e-4")
COLUMNS = [("text_retrieval_recall@1", "image->text R@1"), ("image_retrieval_recall@1", "text->image R@1"),
           ("vqa", "VQA"), ("reasoning", "reasoning"), ("entailment", "entailment")]


def _pretrain_job(variant: str, seed: int, out: Path, quick: bool) -> tuple[str, tuple[str, ...], dict]:
    run_dir = out / f"{variant}-s{seed}"
    settings = [f"regularizers={VARIANTS[variant]}", f"seed={seed}", f"output_dir={run_dir}", f"name=fusion-{variant}-s{seed}",
                f"optim.steps={PRETRAIN_STEPS}", "train.progress=false", "train.checkpoint_every_epochs=0", "eval.gallery=0",
                "eval.tasks=[retrieval]"]
    if quick:
        settings += ["optim.max_steps=2", "data.options.image_size=16", "model.fusion.image_size=16", "model.fusion.queue_size=64"]
    return "fusion", tuple(settings), {"variant": variant, "seed": seed}


def _finetune_job(job: tuple[str, str, int, bool], threads: int = 1) -> dict:
    import torch

    from plait.finetune import finetune

    run_dir, task, seed, quick = job
    torch.set_num_threads(threads)
    out = Path(run_dir) / f"finetune-{task}"
    small = "task_options={pairs: 60}" if task == "reasoning" else "task_options={per_image: 0.1}"
    settings = [*FINETUNE, f"seed={seed}", f"output_dir={out}"] + (["max_steps=2", small, "batch_size=8"] if quick else [])
    start = time.perf_counter()
    result = finetune(Path(run_dir) / "model.safetensors", task, settings)
    return {"run_dir": run_dir, "task": task, "accuracy": result["metrics"]["test_accuracy"],
            "validation_accuracy": result["metrics"].get("validation_accuracy"), "seconds": time.perf_counter() - start}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} +- {100 * spread:.1f}"


def run_fusion_experiment(out: str | Path = "runs/fusion", seeds: int = 3, workers: int = 2, reuse: bool = False,
                          quick: bool = False) -> str:
    """Pre-train every (variant, seed), fine-tune each on the three tasks; returns the table."""
    out = Path(out)
    start = time.perf_counter()
    jobs = [_pretrain_job(variant, seed, out, quick) for variant in VARIANTS for seed in range(seeds)]
    pretrained = sorted(run_many(jobs, workers=workers, reuse=reuse), key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
    tune_jobs = [(r["run_dir"], task, r["seed"], quick) for r in pretrained for task in TASKS]
    if workers <= 1:
        tuned = [_finetune_job(job) for job in tune_jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            tuned = list(pool.imap_unordered(functools.partial(_finetune_job, threads=1), tune_jobs))
    accuracy = {(t["run_dir"], t["task"]): t["accuracy"] for t in tuned}
    rows = []
    for run in pretrained:
        rows.append({"variant": run["variant"], "seed": run["seed"], "run_dir": run["run_dir"],
                     **{key: run["metrics"][key] for key, _ in COLUMNS[:2]},
                     **{task: accuracy[(run["run_dir"], task)] for task in TASKS}})
    budget = "quick: 2 steps each" if quick else f"{PRETRAIN_STEPS} steps"
    lines = [f"E5 on emoji: fusion pre-training ({budget}) then fine-tuning ({', '.join(FINETUNE)}); "
             f"test split, %, mean +- std over {seeds} seed(s)", "",
             "| variant | " + " | ".join(label for _, label in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        lines.append(f"| {variant} | " + " | ".join(_mean_std([r[key] for r in mine]) for key, _ in COLUMNS) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", table)
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "pretrain": pretrained, "finetune": tuned,
                                                         "seconds": time.perf_counter() - start}, indent=1) + "\n")
    _plot(rows, out / "fusion.png")
    return table


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(VARIANTS)
    for k, variant in enumerate(VARIANTS):
        mine = [r for r in rows if r["variant"] == variant]
        means = [100 * statistics.fmean(r[key] for r in mine) for key, _ in COLUMNS]
        spreads = [100 * (statistics.stdev([r[key] for r in mine]) if len(mine) > 1 else 0.0) for key, _ in COLUMNS]
        ax.bar([i + k * width for i in range(len(COLUMNS))], means, width, yerr=spreads, label=variant, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(COLUMNS))], [label for _, label in COLUMNS])
    ax.set_ylabel("test %")
    ax.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
