"""The E-step design choices of the gamma loss, one at a time, on real data (emoji, B = 32).

    plait experiment gamma-ablation [--seeds 3] [--workers 2] [--reuse] [--out runs/gamma-ablation]

Every variant trains E2's emoji equal-step budget at B = 32 with the config's learning rate, and
is scored on the *validation* split (design choices are made there, never on the test split):
image -> text and text -> image R@1, mean +- std over seeds, plus the last epoch's staleness
statistics (``GammaContrastiveLoss.staleness``: the E-step rate's error against a frozen
snapshot, beside the error of one fresh batch estimate). Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from plait.atomic import atomic_write_text
from plait.experiments._runs import run_many
from plait.experiments._stats import mean_std
from plait.experiments.batch_sweep import BUDGETS, VALIDATION_FRACTION, fit_size

BATCH = 32
# name -> (loss, loss options); "refresh" is replaced by the steps of one epoch; a dotted key
# (train.bank_momentum) is a trainer setting.
VARIANTS: dict[str, tuple[str, dict]] = {
    "infonce (reference)": ("infonce", {}),
    "memory, anchor gradient from the batch (default)": ("gamma", {"estimator": "memory"}),
    "memory, anchor gradient over the bank": ("gamma", {"estimator": "memory", "anchor_gradient": "table"}),
    "memory, bank re-encoded every epoch": ("gamma", {"estimator": "memory", "bank_refresh_steps": "refresh"}),
    "memory, no weight cap": ("gamma", {"estimator": "memory", "max_weight": 1e9}),
    "ema, gamma 0.9": ("gamma", {"estimator": "ema", "gamma": 0.9}),
    "ema, gamma 0.5": ("gamma", {"estimator": "ema", "gamma": 0.5}),
    "ema, gamma 0.1": ("gamma", {"estimator": "ema", "gamma": 0.1}),
    "ema, gamma 1 -> 0.5 over 5 visits (cosine)": ("gamma", {"estimator": "ema", "gamma": 0.5, "gamma_decay_visits": 5}),
    "ema, gamma 0.5, no scale correction": ("gamma", {"estimator": "ema", "gamma": 0.5, "scale_correction": False}),
    "memory from a momentum encoder (0.99), anchor gradient over the bank":
        ("gamma", {"estimator": "memory", "anchor_gradient": "table", "train.bank_momentum": 0.99}),
    "memory from a momentum encoder (0.99), anchor gradient from the batch":
        ("gamma", {"estimator": "memory", "train.bank_momentum": 0.99}),
    "memory from a momentum encoder (0.999), anchor gradient over the bank":
        ("gamma", {"estimator": "memory", "anchor_gradient": "table", "train.bank_momentum": 0.999}),
}
KEYS = ("text_retrieval_recall@1", "image_retrieval_recall@1")
STALENESS = ("staleness_log_error", "batch_log_error", "staleness_log_bias")


def _last(run_dir: Path, split: str) -> dict:
    """The run's last metrics.jsonl record of ``split`` ({} without one)."""
    from plait.evaluate.curves import read_records

    records = [r for r in read_records(run_dir, strict=True) if r.get("split") == split]
    return records[-1] if records else {}


def run_gamma_ablation(out_dir, seeds: int = 3, workers: int = 2, reuse: bool = False, quick: bool = False, overrides=()) -> str:
    """Train every variant of ``VARIANTS`` (emoji, B = 32, E2's equal-step budget) for ``seeds`` seeds,
    evaluated on the validation split; write ``results.json`` and ``table.md`` and return the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = 3 if quick else BUDGETS["emoji"]["steps"]
    per_epoch = fit_size("emoji", overrides) // BATCH
    jobs = []
    for number, (name, (loss, options)) in enumerate(VARIANTS.items()):
        for seed in range(1 if quick else seeds):
            run_dir = out / f"v{number}-s{seed}"
            settings = [f"loss.name={loss}", f"data.batch_size={BATCH}", f"seed={seed}", f"optim.steps={steps}",
                        f"data.validation_fraction={VALIDATION_FRACTION}", "eval.split=validation", "eval.tasks=[retrieval]",
                        "eval.gallery=0", "train.progress=false", "train.checkpoint_every_epochs=0",
                        f"output_dir={run_dir}", f"name=ablation-v{number}-s{seed}"]
            for key, value in options.items():
                where = key if "." in key else f"loss.options.{key}"
                settings.append(f"{where}={per_epoch if value == 'refresh' else value}")
            jobs.append(("emoji", (*settings, *overrides), {"variant": name, "seed": seed}))
    runs = run_many(jobs, workers, reuse=reuse)
    for run in runs:
        run["staleness"] = {k: v for k, v in _last(Path(run["run_dir"]), "staleness").items() if k in STALENESS}
    atomic_write_text(out / "results.json", json.dumps({"steps": steps, "batch_size": BATCH, "runs": runs}, indent=1))
    table = ablation_table(runs, steps)
    atomic_write_text(out / "table.md", table)
    return table


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f} +- {std:.2f}" if max(abs(v) for v in values) < 10 else f"{mean:.1f} +- {std:.1f}"


def ablation_table(runs: list[dict], steps: int) -> str:
    """One row per variant: validation R@1 both ways (%) and the last staleness statistics."""
    lines = [f"emoji, B = {BATCH}, {steps} steps, validation split, mean +- std over seeds", "",
             "| variant | image->text R@1 | text->image R@1 | staleness log error | one-batch log error | "
             "staleness log bias | seeds |",
             "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        if not mine:
            continue
        metrics = [_fmt([100 * r["metrics"][k] for r in mine]) for k in KEYS]
        stale = [_fmt([r["staleness"][k] for r in mine if k in r["staleness"]]) for k in STALENESS]
        lines.append(f"| {name} | " + " | ".join(metrics + stale) + f" | {len(mine)} |")
    return "\n".join(lines) + "\n"
