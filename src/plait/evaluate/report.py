"""Run reports: loss curves, metric table and retrieval gallery of a run directory; run comparisons.

A run directory holds (all optional except that a report of nothing is empty):

- ``metrics.jsonl``: one JSON object per line; training lines (no ``split``) carry ``step``,
  ``epoch``, ``loss``, ``lr``, ``samples_per_s``; evaluation lines carry ``"split": "eval"``,
  ``step``, ``epoch`` and metrics; ``"split": "staleness"`` lines carry per-epoch staleness
  diagnostics. Lines of other splits are ignored.
- ``eval.json``: ``{"dataset": ..., "metrics": {name: value}, ...}``, the final metrics.
- ``config.yaml``: shown verbatim.
- ``gallery.npz``: ``images`` uint8 (n, H, W, 3), ``captions`` (n, 5) str (top-5 retrieved),
  ``truth`` (n,) str (the true caption), optionally ``correct`` (n, 5) bool.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from plait.atomic import atomic_write_text, save_figure
from plait.evaluate.curves import integer_ticks, read_records, series
from plait.evaluate.curves import is_number as _is_number

IDENTITY_FIELDS = ("name", "loss", "batch_size")
_NOT_METRICS = {"step", "epoch", "split", "lr", "samples_per_s", "time", "wall_time", "elapsed_s"}
_EVAL_PLOT = "eval.png"
_STALENESS_PLOT = "staleness.png"


# ---------------------------------------------------------------- reading


def _by_split(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by ``split``; lines without one (or ``"train"``) under ``"train"``."""
    splits: dict[str, list[dict]] = {}
    for record in records:
        split = record.get("split", "train")
        splits.setdefault(split if isinstance(split, str) else repr(split), []).append(record)
    return splits


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of ``metrics.jsonl``; unreadable lines are skipped with a warning
    and lines of other splits (``"staleness"``, ...) left out."""
    splits = _by_split(read_records(run_dir))
    return splits.get("train", []), splits.get("eval", [])


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_eval(run_dir: str | Path) -> tuple[dict, dict]:
    """(final metrics, other eval.json fields) of a run.

    Without ``eval.json`` the metrics of the last evaluation line of ``metrics.jsonl`` are used.
    """
    path = Path(run_dir) / "eval.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            warnings.warn(f"{path} is not valid JSON ({error}); ignored", stacklevel=2)
            data = None
        if isinstance(data, dict):
            metrics = data.get("metrics", {})
            fields = {key: value for key, value in data.items() if key != "metrics"}
            return (_flatten(metrics) if isinstance(metrics, dict) else {}), fields
    _, evals = read_metrics(run_dir)
    if evals:
        return _flatten(_eval_metrics(evals[-1])), {}
    return {}, {}


# ---------------------------------------------------------------- formatting


def _format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _format_metric(metrics: dict, key: str) -> str:
    """The value of ``key``, as ``mean ± std`` when ``{key}_std`` is present; ``-`` when missing."""
    if key not in metrics:
        return "-"
    text = _format_value(metrics[key])
    if f"{key}_std" in metrics:
        text += f" ± {_format_value(metrics[f'{key}_std'])}"
    return text


def _metric_keys(metrics: dict) -> list[str]:
    """Keys to show: a ``{key}_std`` whose ``key`` exists is folded into that key's row."""
    return [key for key in metrics if not (key.endswith("_std") and key[: -len("_std")] in metrics)]


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


# ---------------------------------------------------------------- figures


def _x_key(records: list[dict]) -> str:
    """``"epoch"`` when every record has a numeric epoch, else ``"step"``."""
    return "epoch" if records and all(_is_number(r.get("epoch")) for r in records) else "step"


def eval_positions(evals: list[dict]) -> tuple[str, list]:
    """(x key, distinct x values) of the evaluation records: epochs, or steps when some lack an epoch."""
    x = _x_key(evals)
    return x, sorted({r[x] for r in evals if _is_number(r.get(x))})


LOSS_TERMS = ("itc", "itm", "mlm")  # named terms drawn beside the loss (the fusion model's)


def plot_loss(train: list[dict], evals: list[dict], path: Path) -> Path | None:
    """Training loss (and evaluation loss, and the fusion model's ITC / ITM / MLM terms, when
    logged) against step; None without any."""
    from matplotlib.figure import Figure

    points = [(r["step"], r["loss"]) for r in train if _is_number(r.get("step")) and _is_number(r.get("loss"))]
    eval_loss = [(r["step"], r["loss"]) for r in evals if _is_number(r.get("step")) and _is_number(r.get("loss"))]
    if not points and not eval_loss:
        return None
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    if points:
        steps, losses = np.array(points, dtype=float).T
        ax.plot(steps, losses, color="tab:blue", alpha=0.35 if len(losses) > 50 else 1.0, lw=1, label="train loss")
        if len(losses) > 50:
            width = max(len(losses) // 50, 2)
            smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
            ax.plot(steps[width - 1 :], smooth, color="tab:blue", lw=2, label=f"train loss ({width}-step mean)")
    if eval_loss:
        steps, losses = np.array(eval_loss, dtype=float).T
        ax.plot(steps, losses, "o-", color="tab:orange", label="eval loss")
    for term in LOSS_TERMS:  # a fusion model's pre-training terms, when logged
        curve = [(r["step"], r[term]) for r in train if _is_number(r.get("step")) and _is_number(r.get(term))]
        if curve:
            steps, values = np.array(curve, dtype=float).T
            ax.plot(steps, values, "--", lw=1, label=term)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(figure, path, dpi=110)
    return path


def eval_series(evals: list[dict]) -> tuple[str, dict[str, dict]]:
    """(x key, ``{metric: {x: value}}``) of the evaluation metrics in [0, 1] (recalls, accuracies);
    ranks, losses (``*loss``, e.g. ``lp_log_loss``) and ``*_std`` companions are left out."""
    x = _x_key(evals)
    keys = dict.fromkeys(
        key for r in evals for key, value in r.items()
        if key not in _NOT_METRICS and not key.endswith(("loss", "_std")) and _is_number(value)
    )
    curves = {key: series(evals, key, x) for key in keys}
    return x, {key: points for key, points in curves.items() if points and all(0.0 <= v <= 1.0 for v in points.values())}


def _line_styles(n: int):
    """Colour and line style for ``n`` lines: tab10, then the same colours dashed, then dotted."""
    return [(f"C{i % 10}", ("-", "--", ":", "-.")[(i // 10) % 4]) for i in range(n)]


def plot_eval_curves(evals: list[dict], path: Path) -> Path | None:
    """Evaluation metrics in [0, 1], in percent, against epoch (step when epochs are missing), one line
    per metric with the legend beside the axes; None with fewer than two evaluation points."""
    from matplotlib.figure import Figure

    x, curves = eval_series(evals)
    if len(eval_positions(evals)[1]) < 2 or not curves:
        return None
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    ax = figure.subplots()
    for (key, points), (color, style) in zip(curves.items(), _line_styles(len(curves))):
        ax.plot(list(points), [100.0 * v for v in points.values()], marker="o", ms=3, ls=style, color=color, label=key)
    integer_ticks(ax, [v for points in curves.values() for v in points])
    ax.set_xlabel(x)
    ax.set_ylabel("%")
    ax.set_title("evaluation during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=2 if len(curves) > 20 else 1)
    save_figure(figure, path, dpi=110)
    return path


def plot_staleness(records: list[dict], path: Path) -> Path | None:
    """Every numeric key of the ``"staleness"`` records against epoch (step when epochs are missing); None without any."""
    from matplotlib.figure import Figure

    x = _x_key(records)
    keys = dict.fromkeys(key for r in records for key, value in r.items() if key not in _NOT_METRICS and _is_number(value))
    curves = {key: points for key in keys if (points := series(records, key, x))}
    if not curves:
        return None
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    for (key, points), (color, style) in zip(curves.items(), _line_styles(len(curves))):
        ax.plot(list(points), list(points.values()), marker="o", ms=3, ls=style, color=color, label=key)
    integer_ticks(ax, [v for points in curves.values() for v in points])
    ax.set_xlabel(x)
    ax.set_title("staleness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(figure, path, dpi=110)
    return path


def read_gallery(path: Path) -> dict | None:
    """``gallery.npz`` as numpy arrays (``images``, ``captions``, ``truth``, ``correct``), or None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images, captions, truth = data["images"], data["captions"].astype(str), data["truth"].astype(str)
            correct = data["correct"].astype(bool) if "correct" in data.files else captions == truth[:, None]
    except (KeyError, ValueError, OSError) as error:
        warnings.warn(f"{path} could not be read ({error}); gallery skipped", stacklevel=2)
        return None
    if captions.ndim != 2 or len(images) != len(captions) or len(truth) != len(captions) or correct.shape != captions.shape:
        warnings.warn(
            f"{path}: images {images.shape}, captions {captions.shape}, truth {truth.shape} do not line up; gallery skipped",
            stacklevel=2,
        )
        return None
    return {"images": images, "captions": captions, "truth": truth, "correct": correct}


def plot_gallery(gallery: dict, path: Path, max_items: int = 16) -> Path | None:
    """Each query image beside its retrieved captions, best first; correct ones green and bold."""
    from matplotlib.figure import Figure

    n = min(len(gallery["images"]), max_items)
    if n == 0:
        return None
    figure = Figure(figsize=(11, 1.9 * n), layout="constrained")
    axes = figure.subplots(n, 2, squeeze=False, gridspec_kw={"width_ratios": [1, 5]})
    for row in range(n):
        image = np.asarray(gallery["images"][row])
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        axes[row, 0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[row, 0].set_axis_off()
        text_ax = axes[row, 1]
        text_ax.set_axis_off()
        captions, correct = gallery["captions"][row], gallery["correct"][row]
        lines = len(captions) + (0 if correct.any() else 1)
        for rank, (caption, hit) in enumerate(zip(captions, correct), start=1):
            label = f"{rank}. {textwrap.shorten(str(caption), 110, placeholder='...')}" + ("   (correct)" if hit else "")
            text_ax.text(
                0.0, 1 - (rank - 0.5) / lines, label, va="center", fontsize=9,
                color="green" if hit else "black", fontweight="bold" if hit else "normal", transform=text_ax.transAxes,
            )
        if not correct.any():
            truth = textwrap.shorten(str(gallery["truth"][row]), 104, placeholder="...")
            text_ax.text(
                0.0, 0.5 / lines, f"truth: {truth}", va="center", fontsize=9, color="firebrick", style="italic",
                transform=text_ax.transAxes,
            )
    save_figure(figure, path, dpi=100)
    return path


# ---------------------------------------------------------------- report


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _eval_metrics(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in _NOT_METRICS}


def write_report(run_dir: str | Path, fmt: str = "md", max_gallery: int = 16) -> Path:
    """Write ``report.md`` (or a self-contained ``report.html``) into ``run_dir`` and return its path.

    It shows the loss curve (``loss.png``), evaluation during training against epoch (``eval.png``,
    when evaluated at two or more epochs), the staleness diagnostics (``staleness.png``), the final
    metric table, the retrieval gallery (``gallery.png``, first ``max_gallery`` queries) and
    ``config.yaml``; missing inputs are left out.
    """
    if fmt not in ("md", "html"):
        raise ValueError(f"fmt must be 'md' or 'html', got {fmt!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir {str(run_dir)!r} is not a directory")
    splits = _by_split(read_records(run_dir))
    train, evals, staleness = splits.get("train", []), splits.get("eval", []), splits.get("staleness", [])
    metrics, fields = read_eval(run_dir)
    blocks: list[tuple] = [("h1", f"Run report: {run_dir.resolve().name}")]

    if fields:
        blocks.append(("table", ("field", "value"), [(key, _format_value(value)) for key, value in fields.items()]))
    if train:
        last = train[-1]
        summary = ", ".join(f"{key} {_format_value(last[key])}" for key in ("step", "epoch", "loss", "lr", "samples_per_s")
                            if key in last)
        blocks.append(("p", f"{len(train)} training records; last: {summary}."))

    blocks.append(("h2", "Training curves"))
    curves = plot_loss(train, evals, run_dir / "loss.png")
    blocks.append(("image", curves, "loss curves") if curves else ("p", "No training metrics (metrics.jsonl) found."))

    for name in (_EVAL_PLOT, _STALENESS_PLOT):  # figures of an earlier report that this one may not redraw
        (run_dir / name).unlink(missing_ok=True)
    validation = splits.get("validation", [])
    during = validation if validation else evals  # evaluations during training read the validation split if any
    eval_plot = plot_eval_curves(during, run_dir / _EVAL_PLOT)
    if eval_plot is not None:
        x, positions = eval_positions(during)
        placed = sum(_is_number(r.get(x)) for r in during)
        shared = (f" ({placed - len(positions)} more at an {x} already listed: the latest of each {x} is drawn)"
                  if placed > len(positions) else "")
        blocks.append(("h2", "Evaluation during training"))
        on = "the validation split" if validation else "the test split"
        blocks.append(("p", f"{len(positions)} evaluations on {on}, "
                            f"at {x} {', '.join(_format_value(v) for v in positions)}{shared}; "
                            "metrics in [0, 1] shown in percent."))
        blocks.append(("image", eval_plot, "evaluation during training"))
    elif evals and _eval_metrics(evals[-1]) and _flatten(_eval_metrics(evals[-1])) != metrics:
        last = evals[-1]  # one evaluation (or all at one epoch) that the final metric table below does not show
        where = ", ".join(f"{key} {_format_value(last[key])}" for key in ("step", "epoch") if key in last)
        blocks.append(("h2", "Evaluation"))
        blocks.append(("p", f"Evaluation in metrics.jsonl ({where})." if where else "Evaluation in metrics.jsonl."))
        record = _flatten(_eval_metrics(last))
        blocks.append(("table", ("metric", "value"), [(key, _format_metric(record, key)) for key in _metric_keys(record)]))

    if staleness:
        picture = plot_staleness(staleness, run_dir / _STALENESS_PLOT)
        if picture is not None:
            blocks.append(("h2", "Staleness"))
            blocks.append(("image", picture, "staleness"))

    blocks.append(("h2", "Metrics"))
    if metrics:
        blocks.append(("table", ("metric", "value"), [(key, _format_metric(metrics, key)) for key in _metric_keys(metrics)]))
    else:
        blocks.append(("p", "No final metrics (eval.json) found."))

    tuned = read_finetuning(run_dir)
    if tuned:
        blocks.append(("h2", "Fine-tuning"))
        blocks.append(("p", "plait finetune results of this run's backbone (finetune-TASK/finetune.json), accuracy in percent."))
        blocks.append(("table", ("task", "steps", "validation accuracy", "test accuracy"), tuned))

    gallery = read_gallery(run_dir / "gallery.npz")
    if gallery is not None:
        picture = plot_gallery(gallery, run_dir / "gallery.png", max_gallery)
        if picture is not None:
            hits = int(gallery["correct"].any(axis=1).sum())
            blocks.append(("h2", "Retrieval gallery"))
            blocks.append(
                ("p", f"Top-{gallery['captions'].shape[1]} captions retrieved for each query image, best first; "
                      f"the true caption (green, bold) is among them for {hits} of {len(gallery['captions'])} queries.")
            )
            blocks.append(("image", picture, "retrieval gallery"))

    config = run_dir / "config.yaml"
    if config.is_file():
        blocks.append(("h2", "Configuration"))
        blocks.append(("code", "config.yaml", config.read_text(encoding="utf-8")))

    out = run_dir / f"report.{fmt}"
    atomic_write_text(out, _render_md(blocks) if fmt == "md" else _render_html(blocks, run_dir.resolve().name))
    return out


def read_finetuning(run_dir: Path) -> list[tuple]:
    """(task, steps, validation %, test %) of every ``finetune-*/finetune.json`` in ``run_dir``."""
    rows = []
    for path in sorted(run_dir.glob("finetune-*/finetune.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
            metrics = result["metrics"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a file being written or not plait's: the report shows what it can read

        def percent(key):
            value = metrics.get(key)
            return f"{100 * value:.1f}" if _is_number(value) else "-"

        rows.append((str(result.get("task", path.parent.name)), str(result.get("steps", "-")),
                     percent("validation_accuracy"), percent("test_accuracy")))
    return rows


def _render_md(blocks: list[tuple]) -> str:
    parts = []
    for kind, *args in blocks:
        if kind == "h1":
            parts.append(f"# {args[0]}\n")
        elif kind == "h2":
            parts.append(f"## {args[0]}\n")
        elif kind == "p":
            parts.append(f"{args[0]}\n")
        elif kind == "table":
            parts.append(_markdown_table(*args))
        elif kind == "image":
            parts.append(f"![{args[1]}]({args[0].name})\n")
        elif kind == "code":
            fence = _fence(args[1])
            parts.append(f"<details><summary>{args[0]}</summary>\n\n{fence}yaml\n{args[1].rstrip()}\n{fence}\n\n</details>\n")
    return "\n".join(parts)


_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
)


def _render_html(blocks: list[tuple], title: str) -> str:
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body>"]
    for kind, *args in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
        elif kind == "table":
            parts.append(_html_table(*args))
        elif kind == "image":
            parts.append(f"<img alt='{html.escape(args[1])}' src='{_embed(args[0])}'>")
        elif kind == "code":
            parts.append(f"<details><summary>{html.escape(args[0])}</summary><pre>{html.escape(args[1])}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- comparison


def compare_runs(run_dirs: Sequence[str | Path], metric_keys: Sequence[str] | None = None) -> str:
    """A markdown table, one row per run: its directory name, the ``name``/``loss``/``batch_size``
    fields of its eval.json (a column shown when some run has the field with a value other than its
    directory name, so ``name`` equal to ``run`` is not repeated) and ``metric_keys`` (all metrics
    seen, in order, when None). A metric with a ``{key}_std`` companion shows as ``mean ± std``;
    a missing value as ``-``.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    runs = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ValueError(f"run directory {str(run_dir)!r} does not exist")
        runs.append((run_dir.resolve().name, *read_eval(run_dir)))
    if metric_keys is None:
        metric_keys = list(dict.fromkeys(key for _, metrics, _ in runs for key in _metric_keys(metrics)))
    elif isinstance(metric_keys, str):
        metric_keys = [metric_keys]
    identity = [
        field for field in IDENTITY_FIELDS
        if any(field in fields for _, _, fields in runs)
        and not all(field not in fields or _format_value(fields[field]) == name for name, _, fields in runs)
    ]
    header = ["run", *identity, *metric_keys]
    rows = [
        [name, *(_format_value(fields[f]) if f in fields else "-" for f in identity),
         *(_format_metric(m, k) for k in metric_keys)]
        for name, m, fields in runs
    ]
    return _markdown_table(header, rows)
