"""E3: the information gap between modalities, and what the structure regularisers recover.

    plait experiment information-gap [--quick] [--out runs/information-gap]

Synthetic: ``InformationGapDataset`` with 4 label bits, modality a holding ``p`` private bits
that b lacks (p = 0..3, gap Delta = p ln 2 nats). CVPR 2023 Theorem 3.1: a perfectly aligned
representation has a downstream cross-entropy at least Delta above the raw pair's. Measured:
the test cross-entropy and accuracy of a linear probe (C chosen by held-out cross-entropy) on
the CLIP features of both towers [z_a, z_b] (with [z^i_a, z^i_b] added for feature separation),
for CLIP (InfoNCE), +Sep, +Br, +GC, against the same probe on the raw pair [x_a, x_b].

Real: UCI Multiple Features view pairs with unequal label information; linear-probe accuracy
on each tower and on both, against the supervised single-view references (the probe on each
raw view).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from plait.atomic import atomic_write_text, save_figure
from plait.experiments._runs import run_many

PRIVATE_BITS = (0, 1, 2, 3)
LABEL_BITS = 4
VARIANTS = {
    "clip": "[]",
    "sep": "[{name: separation}]",
    "br": "[{name: bridge}]",
    "gc": "[{name: consistency}]",
}
UCI_PAIRS = (("pixels", "morphological"), ("fourier", "karhunen-loeve"))
COLORS = {"clip": "tab:blue", "sep": "tab:purple", "br": "tab:orange", "gc": "tab:green"}


def _common(variant: str, run_dir: Path, seed: int, quick: bool) -> list[str]:
    settings = [f"regularizers={VARIANTS[variant]}", f"output_dir={run_dir}", f"seed={seed}", "train.progress=false",
                "train.checkpoint_every_epochs=0", "eval.tasks=[retrieval]", "eval.gallery=0", "loss.name=infonce"]
    return settings + (["optim.epochs=1", "optim.max_steps=4"] if quick else [])


def _jobs(out: Path, seeds_synthetic: int, seeds_real: int, quick: bool, overrides) -> list:
    jobs = []
    for p in PRIVATE_BITS[:2] if quick else PRIVATE_BITS:
        for variant in VARIANTS:
            for seed in range(seeds_synthetic):
                run_dir = out / "synthetic" / f"p{p}-{variant}-s{seed}"
                settings = [f"data.options.shared={LABEL_BITS - p}", f"data.options.private_a={p}",
                            *_common(variant, run_dir, seed, quick)]
                jobs.append(("gap", (*settings, *overrides),
                             {"part": "synthetic", "private_bits": p, "variant": variant, "seed": seed}))
    for views in UCI_PAIRS[:1] if quick else UCI_PAIRS:
        for variant in VARIANTS:
            for seed in range(seeds_real):
                run_dir = out / "uci" / f"{views[0]}-{views[1]}-{variant}-s{seed}"
                settings = [f"data.options.views=[{views[0]},{views[1]}]", *_common(variant, run_dir, seed, quick)]
                jobs.append(("uci", (*settings, *overrides),
                             {"part": "uci", "views": list(views), "variant": variant, "seed": seed}))
    return jobs


def _probe(train_x, train_y, test_x, test_y, select_by="acc1") -> dict:
    from plait.evaluate import linear_probe

    metrics = linear_probe(train_x, train_y, test_x, test_y, select_by=select_by)
    return {"acc1": metrics["acc1"], "log_loss": metrics["log_loss"]}


def _representations(run_dir: str) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """Train/test features of a trained run: {"a", "b", "both"} (independent features appended
    when the model has them), and the labels."""
    from omegaconf import OmegaConf

    from plait.data import build_dataset
    from plait.evaluate.run import load_model
    from plait.evaluate.suite import embed

    model, config = load_model(Path(run_dir) / "model.safetensors")
    options = OmegaConf.to_container(config.data.options, resolve=True)
    features = "both" if model.independent_a is not None else "shared"
    out = {}
    for split in ("train", "test"):
        dataset = build_dataset(config.data.name, split=split, **options)
        za, zb = embed(model, dataset, 512, torch.device("cpu"), features)
        label = next(iter(dataset.labels))
        out[split] = ({"a": za, "b": zb, "both": torch.cat([za, zb], 1)}, torch.as_tensor(dataset.labels[label]))
    return out["train"][0], out["test"][0], out["train"][1], out["test"][1]


def _raw(name: str, options: dict) -> dict:
    """Probes on the raw views: a, b and the pair (the references)."""
    from plait.data import build_dataset

    train, test = build_dataset(name, "train", **options), build_dataset(name, "test", **options)
    label = next(iter(train.labels))
    y, y_test = torch.as_tensor(train.labels[label]), torch.as_tensor(test.labels[label])
    select = "log_loss" if name == "gap" else "acc1"
    return {
        "a": _probe(train.data_a, y, test.data_a, y_test, select),
        "b": _probe(train.data_b, y, test.data_b, y_test, select),
        "both": _probe(torch.cat([train.data_a, train.data_b], 1), y, torch.cat([test.data_a, test.data_b], 1), y_test, select),
    }


def run_information_gap(out_dir, seeds_synthetic: int = 2, seeds_real: int = 2, quick: bool = False, workers: int = 2,
                        overrides=(), reuse: bool = False) -> str:
    """Train every variant on the synthetic gaps (p private bits) and the UCI view pairs, probe
    each run's features and the raw views; write ``results.json``, ``table.md`` and ``gap.png``
    and return the tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        seeds_synthetic = seeds_real = 1
    started = time.perf_counter()
    runs = run_many(_jobs(out, seeds_synthetic, seeds_real, quick, tuple(overrides)), workers, reuse=reuse)
    for run in runs:
        train, test, y, y_test = _representations(run["run_dir"])
        select = "log_loss" if run["part"] == "synthetic" else "acc1"
        run["probe"] = {key: _probe(train[key], y, test[key], y_test, select) for key in ("a", "b", "both")}
    references = {}
    for p in sorted({r["private_bits"] for r in runs if r["part"] == "synthetic"}):
        references[f"synthetic-p{p}"] = _raw("gap", {"shared": LABEL_BITS - p, "private_a": p})
    for views in sorted({tuple(r["views"]) for r in runs if r["part"] == "uci"}):
        references["uci-" + "-".join(views)] = _raw("uci", {"views": list(views)})
    result = {"label_bits": LABEL_BITS, "seconds": time.perf_counter() - started, "references": references,
              "runs": sorted(runs, key=lambda r: (r["part"], r.get("private_bits", 0), str(r.get("views")), r["variant"],
                                                  r["seed"]))}
    for run in result["runs"]:
        run.pop("metrics", None)
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    table = gap_tables(result)
    atomic_write_text(out / "table.md", table)
    plot_gap(result, out / "gap.png")
    return table


def _mean(values) -> float:
    return statistics.fmean(values)


def gap_tables(result: dict) -> str:
    """The two markdown tables: per p, the probes' test cross-entropy (accuracy) of each variant
    and the raw views, with CLIP's excess against the bound Delta; per UCI view pair, the probes'
    accuracy on tower a, tower b and both against the raw views."""
    runs, refs = result["runs"], result["references"]
    lines = ["**Synthetic** (4 label bits; modality a holds p private bits; Delta = p ln 2 nats). Linear probe on",
             "[z_a, z_b] (+ [z^i_a, z^i_b] with separation): test cross-entropy in nats (accuracy %); the last columns",
             "give CLIP's excess over the raw pair, probing [z_a, z_b] and probing z_b alone (what a perfectly aligned",
             "representation, z_a = z_b, keeps at best), against the bound Delta.", "",
             "| p | Delta | raw pair | raw a | raw b | " + " | ".join(VARIANTS)
             + " | CLIP excess, [z_a, z_b] | CLIP excess, z_b |",
             "|---|---|---|---|---|" + "---|" * len(VARIANTS) + "---|---|"]
    for p in sorted({r["private_bits"] for r in runs if r["part"] == "synthetic"}):
        ref = refs[f"synthetic-p{p}"]
        cells, clip = [], None
        for variant in VARIANTS:
            chosen = [r["probe"] for r in runs if r["part"] == "synthetic" and r["private_bits"] == p and r["variant"] == variant]
            if not chosen:
                cells.append("-")
                continue
            ce, acc = _mean([c["both"]["log_loss"] for c in chosen]), _mean([c["both"]["acc1"] for c in chosen])
            if variant == "clip":
                clip = {key: _mean([c[key]["log_loss"] for c in chosen]) for key in ("both", "b")}
            cells.append(f"{ce:.3f} ({100 * acc:.1f})")
        raw = [f"{ref[k]['log_loss']:.3f} ({100 * ref[k]['acc1']:.1f})" for k in ("both", "a", "b")]
        excess = ["-", "-"] if clip is None else [f"{clip[key] - ref['both']['log_loss']:.3f}" for key in ("both", "b")]
        lines.append(f"| {p} | {p * math.log(2):.3f} | " + " | ".join(raw) + " | " + " | ".join(cells) + " | "
                     + " | ".join(excess) + " |")
    lines += ["", "**UCI Multiple Features** view pairs: linear-probe accuracy (%), mean over seeds, "
                  "on tower a / tower b / both;",
              "references: the probe on each raw view (supervised single-view) and on the raw pair.", "",
              "| views (a, b) | model | tower a | tower b | both |", "|---|---|---|---|---|"]
    for views in sorted({tuple(r["views"]) for r in runs if r["part"] == "uci"}):
        ref = refs["uci-" + "-".join(views)]
        lines.append(f"| {views[0]}, {views[1]} | raw features (supervised reference) | {100 * ref['a']['acc1']:.1f} | "
                     f"{100 * ref['b']['acc1']:.1f} | {100 * ref['both']['acc1']:.1f} |")
        for variant in VARIANTS:
            chosen = [r["probe"] for r in runs if r["part"] == "uci" and tuple(r["views"]) == views and r["variant"] == variant]
            if chosen:
                values = [f"{100 * _mean([c[k]['acc1'] for c in chosen]):.1f}" for k in ("a", "b", "both")]
                lines.append(f"| {views[0]}, {views[1]} | {variant} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot_gap(result: dict, path: Path) -> None:
    """The synthetic part as a figure at ``path``: probe cross-entropy against the gap Delta for
    the raw pair, the bound raw pair + Delta, each variant's [z_a, z_b] and CLIP's z_b alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, refs = result["runs"], result["references"]
    ps = sorted({r["private_bits"] for r in runs if r["part"] == "synthetic"})
    deltas = [p * math.log(2) for p in ps]
    raw = [refs[f"synthetic-p{p}"]["both"]["log_loss"] for p in ps]
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    ax.plot(deltas, raw, "k-o", label="raw pair (both modalities)")
    ax.plot(deltas, [r + d for r, d in zip(raw, deltas)], "k:", label="raw pair + Delta (Theorem 3.1 bound for aligned features)")
    for variant in VARIANTS:
        values = [_mean([r["probe"]["both"]["log_loss"] for r in runs
                         if r["part"] == "synthetic" and r["private_bits"] == p and r["variant"] == variant] or [math.nan])
                  for p in ps]
        ax.plot(deltas, values, "-o", color=COLORS[variant], label=f"{variant} features [z_a, z_b]")
    tower_b = [_mean([r["probe"]["b"]["log_loss"] for r in runs
                      if r["part"] == "synthetic" and r["private_bits"] == p and r["variant"] == "clip"] or [math.nan])
               for p in ps]
    ax.plot(deltas, tower_b, "--s", color=COLORS["clip"], label="clip z_b alone (as if perfectly aligned)")
    ax.set_xlabel("information gap Delta (nats)")
    ax.set_ylabel("downstream test cross-entropy (nats)")
    ax.set_title("E3: linear probe on the two towers' features")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
