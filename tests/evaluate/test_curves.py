import json
import math

import pytest
from matplotlib.figure import Figure

from plait.evaluate.curves import curves_table, plot_metric_curves

PNG = b"\x89PNG\r\n\x1a\n"
METRIC = "text_retrieval_recall@1"


def _run(path, evals, extra=""):
    """A run directory whose metrics.jsonl holds a few training lines, ``evals`` as (epoch, step, value) and a staleness line."""
    path.mkdir(parents=True)
    lines = [{"step": s, "epoch": 0, "loss": 3.0, "lr": 1e-3, METRIC: 0.99} for s in (5, 10)]  # a training line is not an eval
    lines += [{"step": step, "epoch": epoch, "split": "eval", **({METRIC: value} if value is not None else {}), "lp_acc1": 0.5}
              for epoch, step, value in evals]
    lines.append({"step": 10, "epoch": 1, "split": "staleness", METRIC: 0.99})
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + extra)
    return path


@pytest.fixture
def groups(tmp_path):
    a = [
        _run(tmp_path / "a0", [(1, 10, 0.1), (2, 20, 0.2), (3, 30, 0.3)]),
        _run(tmp_path / "a1", [(1, 10, 0.3), (2, 20, 0.4), (3, 30, 0.5)]),
        _run(tmp_path / "a2", [(1, 10, 0.2), (2, 20, 0.6)]),  # stopped after epoch 2: epoch 3 is not common
    ]
    b = [_run(tmp_path / "b0",
              [(1, 40, 0.5), (2, 80, 0.7), (2, 80, 0.75), (3, 120, 0.8)])]  # a repeated epoch: the later line wins
    c = [_run(tmp_path / "c0", [(1, 10, None), (2, 20, None)]), tmp_path / "no-such-run"]  # no run holds the metric
    return {"infonce B=512": a, "gamma B=32": b, "none": c}


def test_mean_and_std_over_seeds(groups, tmp_path):
    path = tmp_path / "out" / "recall.png"
    curves = plot_metric_curves(groups, METRIC, path, title="R@1", colors={"gamma B=32": "tab:red"})
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    assert list(curves) == ["infonce B=512", "gamma B=32"]  # "none" skipped
    a, b = curves["infonce B=512"], curves["gamma B=32"]
    assert a["seeds"] == 3 and a["x"] == [1, 2]
    # epoch 1: 10, 30, 20 % -> mean 20, sample std sqrt((100 + 100 + 0) / 2) = 10
    # epoch 2: 20, 40, 60 % -> mean 40, sample std sqrt((400 + 0 + 400) / 2) = 20
    assert a["mean"] == pytest.approx([20.0, 40.0]) and a["std"] == pytest.approx([10.0, 20.0])
    assert b == {"x": [1, 2, 3], "mean": pytest.approx([50.0, 75.0, 80.0]), "std": [0.0, 0.0, 0.0], "seeds": 1}


def test_drawn_lines_and_bands(groups, tmp_path, monkeypatch):
    drawn = {}
    save = Figure.savefig

    def spy(figure, path, *args, **kwargs):
        (ax,) = figure.axes
        drawn["lines"] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_color())
                          for line in ax.get_lines()}
        drawn["bands"] = len(ax.collections)
        drawn["labels"] = (ax.get_xlabel(), ax.get_ylabel(), ax.get_title())
        drawn["legend"] = [text.get_text() for text in ax.get_legend().get_texts()]
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    plot_metric_curves(groups, METRIC, tmp_path / "r.png", colors={"gamma B=32": "tab:red"})
    a = drawn["lines"]["infonce B=512 (3 seeds)"]
    assert a[0] == [1, 2] and a[1] == pytest.approx([20.0, 40.0])
    assert drawn["lines"]["gamma B=32 (1 seed)"][2] == "tab:red"
    assert drawn["bands"] == 1  # the band of the three seeds; one seed has none
    assert drawn["labels"] == ("epoch", f"{METRIC} (%)", "")
    assert drawn["legend"] == ["infonce B=512 (3 seeds)", "gamma B=32 (1 seed)"]


def test_against_step(groups, tmp_path):
    curves = plot_metric_curves(groups, METRIC, tmp_path / "s.png", x="step", ylabel="R@1 (%)")
    assert curves["infonce B=512"]["x"] == [10, 20]
    assert curves["gamma B=32"]["x"] == [40, 80, 120]
    with pytest.raises(ValueError, match="x must be"):
        plot_metric_curves(groups, METRIC, tmp_path / "t.png", x="time")


def test_no_group_holds_the_metric(groups, tmp_path):
    path = tmp_path / "empty.png"
    assert plot_metric_curves(groups, "zeroshot_acc1", path) == {}
    assert path.read_bytes()[:8] == PNG
    assert curves_table({}) == "| x |\n|---|\n"


def test_a_line_that_is_not_json_names_the_file(tmp_path):
    run = _run(tmp_path / "broken", [(1, 10, 0.1)], extra='{"step": 20, "split": "ev')
    with pytest.raises(ValueError, match=r"broken/metrics\.jsonl:\d+ is not valid JSON"):
        plot_metric_curves({"g": [run]}, METRIC, tmp_path / "x.png")


def test_curves_table(groups, tmp_path):
    curves = plot_metric_curves(groups, METRIC, tmp_path / "r.png")
    assert curves_table(curves) == (
        "| x | infonce B=512 | gamma B=32 |\n"
        "|---|---|---|\n"
        "| 1 | 20.0 +- 10.0 | 50.0 +- 0.0 |\n"
        "| 2 | 40.0 +- 20.0 | 75.0 +- 0.0 |\n"
        "| 3 | - | 80.0 +- 0.0 |\n"
    )
    every = curves_table(curves, every=2).splitlines()
    assert [line.split(" | ")[0] for line in every[2:]] == ["| 1", "| 3"]
    last = curves_table({"g": {"x": [0.5, 1.0, 1.5, 2.0], "mean": [1, 2, 3, 4.25], "std": [0, 0, 0, math.sqrt(2)], "seeds": 2}},
                        every=2)
    assert last.splitlines()[2:] == ["| 0.5 | 1.0 +- 0.0 |", "| 1.5 | 3.0 +- 0.0 |", "| 2 | 4.2 +- 1.4 |"]
    with pytest.raises(ValueError, match="every"):
        curves_table(curves, every=0)
