"""E4: the modality structure regularisers on real data, and the weight sweep behind their defaults.

    plait experiment regularizers [--datasets uci emoji] [--seeds 3] [--quick]
    plait experiment regularizers --sweep-weights     # choose each regulariser's default weight

Table: for each dataset, base loss (InfoNCE, gamma) and regulariser set (none, sep, br, gc, all),
mean +- std over seeds of the downstream metrics. Every variant uses the in-modal base
L_Con = 1/4 (V2T + T2V + V2V + T2T) with augmented views, so the regularisers are the only
difference; probes read [z, z^i] when feature separation is on, z otherwise.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from plait.atomic import atomic_write_text, save_figure
from plait.experiments._runs import run_many
from plait.losses.regularizers import DEFAULT_WEIGHTS

VARIANTS = {
    "none": [],
    "sep": [{"name": "separation"}],
    "br": [{"name": "bridge"}],
    "gc": [{"name": "consistency"}],
    "all": [{"name": "separation"}, {"name": "bridge"}, {"name": "consistency"}],
}
METRICS = {
    "uci": [("lp_acc1", "linear probe")],
    "emoji": [("zeroshot_acc1", "zero-shot group"), ("text_retrieval_recall@1", "image->text R@1"), ("lp_acc1", "linear probe")],
}
EPOCHS = {"uci": 60, "emoji": 10}
SWEEP_WEIGHTS = (0.1, 0.3, 1.0)


def _spec_string(specs: list[dict], weights: dict[str, float]) -> str:
    items = []
    for spec in specs:
        weight = weights.get(spec["name"], DEFAULT_WEIGHTS[spec["name"]])
        items.append("{" + f"name: {spec['name']}, weight: {weight}" + "}")
    return "[" + ", ".join(items) + "]"


def _overrides(dataset: str, base: str, variant: str, seed: int, out: Path, quick: bool,
               weights: dict[str, float]) -> tuple[str, ...]:
    specs = VARIANTS[variant]
    features = "both" if any(spec["name"] == "separation" for spec in specs) else "shared"
    tasks = "[retrieval,zero_shot,linear_probe]" if dataset == "emoji" else "[retrieval,linear_probe]"
    run_dir = out / dataset / f"{base}-{variant}-s{seed}"
    settings = [
        f"loss.name={base}", "loss.in_modal=true", f"regularizers={_spec_string(specs, weights)}", f"seed={seed}",
        f"optim.epochs={EPOCHS[dataset]}", f"output_dir={run_dir}", f"name={dataset}-{base}-{variant}-s{seed}",
        "train.progress=false", "train.checkpoint_every_epochs=0", f"eval.tasks={tasks}", f"eval.features={features}",
        "eval.gallery=0",
    ]
    if quick:
        settings += ["optim.epochs=1", "optim.max_steps=4"]
    return tuple(settings)


def run_regularizer_table(out_dir, datasets=("uci", "emoji"), bases=("infonce", "gamma"), variants=tuple(VARIANTS),
                          seeds: int = 3, quick: bool = False, workers: int = 2, overrides=(),
                          reuse: bool = False) -> str:
    """Train every dataset x base loss x regulariser set x seed (in-modal base, default weights);
    write ``results.json``, ``table.md`` and ``regularizers.png`` and return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        seeds, variants = 1, ("none", "all")
    jobs = [(d, (*_overrides(d, base, v, s, out, quick, {}), *overrides), {"dataset": d, "base": base, "variant": v, "seed": s})
            for d in datasets for base in bases for v in variants for s in range(seeds)]
    jobs.sort(key=lambda job: job[0] != "emoji")  # the long emoji runs first
    started = time.perf_counter()
    runs = sorted(run_many(jobs, workers, reuse=reuse),
                  key=lambda r: (r["dataset"], r["base"], list(VARIANTS).index(r["variant"]), r["seed"]))
    result = {"seeds": seeds, "weights": DEFAULT_WEIGHTS, "seconds": time.perf_counter() - started, "runs": runs}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    table = regularizer_table(result)
    atomic_write_text(out / "table.md", table)
    plot_regularizers(result, out / "regularizers.png")
    return table


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} +- {100 * std:.1f}"


def regularizer_table(result: dict) -> str:
    """Per dataset, a markdown table of each base loss and regulariser set's metrics (%, mean +- std
    over seeds), then which regularisers beat their base's linear probe beyond the seed spread."""
    cells: dict[tuple, list[dict]] = {}
    for run in result["runs"]:
        cells.setdefault((run["dataset"], run["base"], run["variant"]), []).append(run["metrics"])
    lines = []
    for dataset in sorted({key[0] for key in cells}):
        metrics = METRICS[dataset]
        lines += [f"**{dataset}** (% , mean +- std over {result['seeds']} seeds)", "",
                  "| base | regulariser | " + " | ".join(label for _, label in metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        for base in ("infonce", "gamma"):
            for variant in VARIANTS:
                runs = cells.get((dataset, base, variant))
                if runs:
                    values = [_mean_std([r[key] for r in runs]) for key, _ in metrics]
                    lines.append(f"| {base} | {variant} | " + " | ".join(values) + " |")
        lines.append("")
        lines += _verdict(cells, dataset)
    return "\n".join(lines)


def plot_regularizers(result: dict, path: Path) -> None:
    """One panel per (dataset, metric): mean +- std over seeds per regulariser set, a bar per base loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple, list[float]] = {}
    for run in result["runs"]:
        for key, _ in METRICS[run["dataset"]]:
            cells.setdefault((run["dataset"], key, run["base"], run["variant"]), []).append(100.0 * run["metrics"][key])
    panels = [(d, key, label) for d in sorted({k[0] for k in cells}) for key, label in METRICS[d]]
    bases = [b for b in ("infonce", "gamma") if any(k[2] == b for k in cells)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    width = 0.8 / max(len(bases), 1)
    for ax, (dataset, key, label) in zip(axes[0], panels):
        for j, base in enumerate(bases):
            values = [cells.get((dataset, key, base, v), []) for v in VARIANTS]
            means = [statistics.fmean(v) if v else float("nan") for v in values]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            xs = [i + (j - (len(bases) - 1) / 2) * width for i in range(len(VARIANTS))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=base, color=("tab:blue", "tab:red")[j % 2])
        shown = [m for base in bases for v in VARIANTS for m in cells.get((dataset, key, base, v), [])]
        low, high = min(shown), max(shown)
        pad = max(1.0, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - 3 * pad), high + pad)
        ax.set_xticks(range(len(VARIANTS)), list(VARIANTS))
        ax.set_title(f"{dataset}: {label}", fontsize=9)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"E4: regularisers on each base loss (mean +- std over {result['seeds']} seeds)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _verdict(cells: dict, dataset: str) -> list[str]:
    """Does a regulariser beat its plain base by >= 1 point of linear probe beyond the seed spread?"""
    lines = []
    for base in ("infonce", "gamma"):
        plain = cells.get((dataset, base, "none"))
        if not plain or len(plain) < 2:
            continue
        p = [r["lp_acc1"] * 100 for r in plain]
        for variant in ("sep", "br", "gc", "all"):
            runs = cells.get((dataset, base, variant))
            if not runs or len(runs) < 2:
                continue
            v = [r["lp_acc1"] * 100 for r in runs]
            gain = statistics.fmean(v) - statistics.fmean(p)
            spread = max(statistics.stdev(v), statistics.stdev(p))
            if gain >= 1.0 + spread:
                lines.append(f"- {base} + {variant}: linear probe {gain:+.1f} points over {base} alone "
                             f"(spread {spread:.1f}): beats it beyond the seed spread")
    return lines + ([""] if lines else [f"- no regulariser beats its base by 1 point beyond the seed spread on {dataset}", ""])


def sweep_weights(out_dir, seeds: int = 2, workers: int = 2, quick: bool = False, overrides=(), reuse: bool = False) -> str:
    """UCI (pixels <-> Fourier), InfoNCE base: each regulariser at each weight in SWEEP_WEIGHTS."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for s in range(1 if quick else seeds):
        jobs.append(("uci", (*_overrides("uci", "infonce", "none", s, out / "none", quick, {}), *overrides),
                     {"regularizer": "none", "weight": 0.0, "seed": s}))
        for variant, name in (("sep", "separation"), ("br", "bridge"), ("gc", "consistency")):
            for weight in SWEEP_WEIGHTS:
                settings = _overrides("uci", "infonce", variant, s, out / f"w{weight}", quick, {name: weight})
                jobs.append(("uci", (*settings, *overrides), {"regularizer": name, "weight": weight, "seed": s}))
    runs = run_many(jobs, workers, reuse=reuse)
    atomic_write_text(out / "results.json", json.dumps({"runs": runs}, indent=1))
    cells: dict[tuple, list[float]] = {}
    for run in runs:
        cells.setdefault((run["regularizer"], run["weight"]), []).append(run["metrics"]["lp_acc1"])
    lines = ["| regulariser | weight | UCI linear probe (%) |", "|---|---|---|"]
    best = {}
    for (name, weight), values in sorted(cells.items()):
        lines.append(f"| {name} | {weight} | {_mean_std(values)} |")
        if name != "none" and statistics.fmean(values) > best.get(name, (-1, 0))[0]:
            best[name] = (statistics.fmean(values), weight)
    lines += ["", "best weight per regulariser: " + ", ".join(f"{n} {w}" for n, (_, w) in sorted(best.items()))]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", table)
    return table
