"""E2: quality against batch size per loss, the SogCLR batch sweep on plait's data.

    plait experiment batch-sweep [--datasets emoji uci] [--batch-sizes 16 32 ... 512]
                                 [--losses infonce gamma sogclr] [--seeds 3] [--quick]

Every run trains for the config's number of epochs (so small batches take more steps), with the
learning rate scaled by sqrt(B / 32). Measured: image -> text R@1 on the emoji test split and
linear-probe accuracy on the UCI test digits (view a's embeddings). Target: the decomposable
loss at B = 32 within 1 point of (or above) InfoNCE at B = 512 on both.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from plait.experiments._runs import run_many
from plait.experiments.small_batch import scaled_lr

METRIC = {"emoji": "text_retrieval_recall@1", "uci": "lp_acc1"}
# Epochs per run (the same for every batch size and loss): emoji's 10 keep the 54-run emoji grid
# near 45 minutes on 2 cores; UCI's 60 are DESIGN.md's calibration setting.
EPOCHS = {"emoji": 10, "uci": 60}
METRIC_LABEL = {"emoji": "image -> text R@1 (%)", "uci": "linear-probe accuracy (%)"}
COLORS = {"infonce": "tab:blue", "gamma": "tab:red", "sogclr": "tab:green"}


def _job_overrides(dataset: str, loss: str, batch_size: int, seed: int, out: Path, quick: bool, base_lr: float) -> list[str]:
    run_dir = out / dataset / f"{loss}-b{batch_size}-s{seed}"
    settings = [
        f"loss.name={loss}", f"data.batch_size={batch_size}", f"seed={seed}", f"optim.lr={scaled_lr(base_lr, batch_size)}",
        f"optim.epochs={EPOCHS[dataset]}",
        f"output_dir={run_dir}", f"name={dataset}-{loss}-b{batch_size}-s{seed}", "train.progress=false",
        "train.checkpoint_every_epochs=0", f"eval.tasks=[{'retrieval' if dataset == 'emoji' else 'retrieval,linear_probe'}]",
        "eval.gallery=0",
    ]
    if quick:
        settings += ["optim.epochs=1", "optim.max_steps=5"]
    return settings


def run_batch_sweep(out_dir, datasets=("emoji", "uci"), batch_sizes=(16, 32, 64, 128, 256, 512),
                    losses=("infonce", "gamma", "sogclr"), seeds: int = 3, quick: bool = False, workers: int = 2,
                    overrides=(), reuse: bool = False) -> str:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(datasets) - set(METRIC))
    if unknown:
        raise ValueError(f"batch-sweep datasets must be among {sorted(METRIC)}, got {unknown}")
    if quick:
        batch_sizes, seeds = tuple(batch_sizes)[:2], 1
    from plait.config import load_config

    jobs = []
    for dataset in datasets:
        base_lr = load_config(dataset, list(overrides)).optim.lr
        for b in batch_sizes:
            for loss in losses:
                for s in range(seeds):
                    settings = _job_overrides(dataset, loss, b, s, out, quick, base_lr)
                    jobs.append((dataset, (*settings, *overrides), {"dataset": dataset, "loss": loss, "batch_size": b, "seed": s}))
    jobs.sort(key=lambda job: job[2]["batch_size"])  # small batches (most steps) first
    started = time.perf_counter()
    runs = run_many(jobs, workers, reuse=reuse)
    for run in runs:
        run["value"] = 100.0 * run["metrics"][METRIC[run["dataset"]]]
    runs.sort(key=lambda r: (r["dataset"], r["loss"], r["batch_size"], r["seed"]))
    result = {"metric": METRIC, "batch_sizes": list(batch_sizes), "losses": list(losses), "seeds": seeds,
              "seconds": time.perf_counter() - started, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = summary_table(result)
    (out / "table.md").write_text(table)
    plot_sweep(result, out / "sweep.png")
    return table


def _cells(result: dict) -> dict:
    cells: dict[tuple, list[float]] = {}
    for run in result["runs"]:
        cells.setdefault((run["dataset"], run["loss"], run["batch_size"]), []).append(run["value"])
    return cells


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_table(result: dict) -> str:
    cells = _cells(result)
    lines = []
    for dataset in sorted({run["dataset"] for run in result["runs"]}):
        sizes = sorted({b for (d, _, b) in cells if d == dataset})
        lines += [f"**{dataset}**: {METRIC_LABEL[dataset]}, mean +- std over {result['seeds']} seeds", "",
                  "| loss | " + " | ".join(f"B={b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for loss in result["losses"]:
            row = []
            for b in sizes:
                values = cells.get((dataset, loss, b))
                row.append("-" if not values else "{:.1f} +- {:.1f}".format(*_mean_std(values)))
            lines.append(f"| {loss} | " + " | ".join(row) + " |")
        gamma, infonce = cells.get((dataset, "gamma", 32)), cells.get((dataset, "infonce", 512))
        if gamma and infonce:
            gap = statistics.fmean(gamma) - statistics.fmean(infonce)
            verdict = "met" if gap >= -1.0 else "missed"
            lines += ["", f"gamma at B=32 minus InfoNCE at B=512: {gap:+.1f} points (target >= -1.0: {verdict})"]
        lines.append("")
    return "\n".join(lines)


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(result)
    datasets = sorted({run["dataset"] for run in result["runs"]})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for loss in result["losses"]:
            sizes = sorted(b for (d, l, b) in cells if d == dataset and l == loss)
            if not sizes:
                continue
            stats = [_mean_std(cells[(dataset, loss, b)]) for b in sizes]
            ax.errorbar(sizes, [m for m, _ in stats], yerr=[s for _, s in stats], color=COLORS.get(loss), marker="o",
                        capsize=3, label=loss)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B")
        ax.set_ylabel(METRIC_LABEL[dataset])
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("E2 batch sweep: same epochs per run, lr scaled by sqrt(B/32); mean +- std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
