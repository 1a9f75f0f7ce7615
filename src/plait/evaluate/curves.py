"""Evaluation-during-training curves: reading ``metrics.jsonl`` records and overlaying runs.

``plot_metric_curves`` draws, for each group of runs (one run per seed), the mean of one
evaluation metric against epoch or step with a mean +- std band; ``curves_table`` tabulates
what it returns.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

from plait.atomic import save_figure

X_KEYS = ("epoch", "step")


def read_records(run_dir: str | Path, strict: bool = False) -> list[dict]:
    """The JSON objects of ``run_dir/metrics.jsonl``, in order; [] without the file.

    A line that is not JSON raises ValueError naming the file when ``strict``, else is skipped
    with a warning. Blank lines and non-object values are skipped.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if strict:
                raise ValueError(f"{path}:{number} is not valid JSON ({error})") from None
            warnings.warn(f"{path}:{number} is not valid JSON; skipped", stacklevel=3)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def is_number(value) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series(records: list[dict], key: str, x: str = "epoch") -> dict[float, float]:
    """``{x: value}`` of ``key`` over ``records`` holding both as numbers, sorted by x; a later record wins a tie."""
    points = {}
    for record in records:
        if is_number(record.get(x)) and is_number(record.get(key)):
            points[record[x]] = float(record[key])
    return dict(sorted(points.items()))


def integer_ticks(ax, xs) -> None:
    """Whole-number x ticks when every x value is whole (epochs, steps)."""
    if xs and all(float(v).is_integer() for v in xs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value), as in the experiment tables."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_curve(run_dirs: list[Path], metric: str, x: str = "epoch", split: str = "eval") -> dict | None:
    """Mean and std (percent) of ``metric`` over the runs at the x values they all share; None without data.
    ``split``: the records read ("eval": the test split; "validation": evaluations on the validation split)."""
    runs = [series([r for r in read_records(d, strict=True) if r.get("split") == split], metric, x) for d in run_dirs]
    runs = [run for run in runs if run]
    if not runs:
        return None
    common = sorted(set.intersection(*(set(run) for run in runs)))
    if not common:
        warnings.warn(f"runs {[str(d) for d in run_dirs]} share no {x} value for {metric}; skipped", stacklevel=3)
        return None
    stats = [_mean_std([100.0 * run[value] for run in runs]) for value in common]
    return {"x": common, "mean": [m for m, _ in stats], "std": [s for _, s in stats], "seeds": len(runs)}


def plot_metric_curves(
    groups: dict[str, list[Path]],
    metric: str,
    path: Path,
    title: str = "",
    ylabel: str | None = None,
    colors: dict[str, str] | None = None,
    x: str = "epoch",
    split: str = "eval",
) -> dict[str, dict]:
    """Overlay ``metric`` of the eval records of each group's runs: mean line and mean +- std band, in percent.

    Seeds are aligned on the x values (``"epoch"`` or ``"step"``) they all have. A group whose runs
    lack the metric is left out. Writes the PNG at ``path`` and returns
    ``{label: {"x": [...], "mean": [...], "std": [...], "seeds": n}}`` (mean and std in percent,
    std with ddof=1).
    """
    if x not in X_KEYS:
        raise ValueError(f"x must be one of {X_KEYS}, got {x!r}")
    curves = {}
    for label, run_dirs in groups.items():
        curve = group_curve([Path(d) for d in run_dirs], metric, x, split)
        if curve is not None:
            curves[label] = curve

    from matplotlib.figure import Figure  # no pyplot: no GUI backend, as with Agg

    figure = Figure(figsize=(7, 4.2), layout="constrained")
    ax = figure.subplots()
    palette = [f"C{i}" for i in range(10)]
    for index, (label, curve) in enumerate(curves.items()):
        color = (colors or {}).get(label, palette[index % len(palette)])
        mean, std = curve["mean"], curve["std"]
        ax.plot(curve["x"], mean, "o-", ms=3, lw=1.8, color=color,
                label=f"{label} ({curve['seeds']} seed{'s' if curve['seeds'] != 1 else ''})")
        if curve["seeds"] > 1:
            ax.fill_between(curve["x"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.2, lw=0)
    if curves:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, f"no run holds {metric}", ha="center", va="center", transform=ax.transAxes)
    integer_ticks(ax, [v for curve in curves.values() for v in curve["x"]])
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel if ylabel is not None else f"{metric} (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(figure, path, dpi=110)
    return curves


def _format_x(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def curves_table(curves: dict[str, dict], every: int = 1) -> str:
    """Markdown table of ``plot_metric_curves``' result: a row per x value (every ``every``-th and the
    last), a column per group, cells ``mean +- std`` (``-`` where a group lacks that x)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    xs = sorted({value for curve in curves.values() for value in curve["x"]})
    rows = [value for index, value in enumerate(xs) if index % every == 0 or index == len(xs) - 1]
    cells = {label: dict(zip(c["x"], zip(c["mean"], c["std"]))) for label, c in curves.items()}
    lines = ["| " + " | ".join(["x", *(label.replace("|", "\\|") for label in curves)]) + " |", "|---|" + "---|" * len(curves)]
    for value in rows:
        row = ["{:.1f} +- {:.1f}".format(*cells[label][value]) if value in cells[label] else "-" for label in curves]
        lines.append("| " + " | ".join([_format_x(value), *row]) + " |")
    return "\n".join(lines) + "\n"
