import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from plait.evaluate import compare_runs, write_report
from plait.evaluate import report as report_module
from plait.evaluate.report import eval_series, read_gallery, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _make_run(path, *, eval_json=True, gallery=True, config=True, metrics=None, fields=None):
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "epoch": s // 50, "loss": 5.0 / (1 + s / 20), "lr": 1e-3, "samples_per_s": 900.0})
             for s in range(120)]
    lines += [json.dumps({"step": s, "epoch": s // 50, "split": "eval", "image_retrieval_recall@1": s / 200,
                          "text_retrieval_median_rank": 7.0}) for s in (40, 80, 119)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if eval_json:
        payload = {"dataset": "toy-coco", **(fields or {"name": "gamma-b4", "loss": "gamma", "batch_size": 4})}
        payload["metrics"] = metrics or {"image_retrieval_recall@1": 0.4321, "acc1": 0.8765, "acc1_std": 0.0123}
        (path / "eval.json").write_text(json.dumps(payload))
    if config:
        (path / "config.yaml").write_text("model:\n  dim: 64\nloss: gamma  # the decomposable one\n")
    if gallery:
        rng = np.random.default_rng(0)
        captions = np.array([[f"caption {i}-{j}" for j in range(5)] for i in range(3)])
        truth = np.array(["caption 0-1", "a caption nobody retrieved", "caption 2-0"])
        images = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
        np.savez(path / "gallery.npz", images=images, captions=captions, truth=truth)
    return path


def test_markdown_report(tmp_path):
    run = _make_run(tmp_path / "run-a")
    report = write_report(run)
    assert report == run / "report.md" and report.is_file()
    text = report.read_text()
    for picture in ("loss.png", "eval.png", "gallery.png"):
        assert f"]({picture})" in text
        assert (run / picture).stat().st_size > 1000 and (run / picture).read_bytes()[:8] == PNG
    assert "| image_retrieval_recall@1 | 0.4321 |" in text
    assert "| acc1 | 0.8765 ± 0.0123 |" in text and "acc1_std" not in text
    assert "toy-coco" in text and "gamma-b4" in text
    assert "dim: 64" in text and "# the decomposable one" in text and "<details>" in text
    assert "for 2 of 3 queries" in text
    assert "120 training records" in text
    assert "## Evaluation during training" in text and "3 evaluations on the test split, at epoch 0, 1, 2" in text


def test_gallery_marks_the_true_caption(tmp_path):
    gallery = read_gallery(_make_run(tmp_path / "run") / "gallery.npz")
    assert gallery["correct"].tolist() == [
        [False, True, False, False, False],
        [False] * 5,
        [True, False, False, False, False],
    ]


def test_html_report_is_self_contained(tmp_path):
    run = _make_run(tmp_path / "run-b")
    report = write_report(run, fmt="html")
    assert report == run / "report.html"
    text = report.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == 3 and all(base64.b64decode(data)[:8] == PNG for data in images)
    assert "loss.png'" not in text and "eval.png'" not in text and "gallery.png'" not in text
    assert "<td>0.4321</td>" in text and "0.8765 ± 0.0123" in text
    assert "# the decomposable one" in text and text.lstrip().startswith("<!DOCTYPE html>")


def test_missing_optional_files_are_tolerated(tmp_path):
    run = _make_run(tmp_path / "bare", eval_json=False, gallery=False, config=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 120, "loss": 0.1')  # a line cut short by a crash
    with pytest.warns(UserWarning, match="not valid JSON"):
        text = write_report(run).read_text()
    assert (run / "loss.png").is_file() and not (run / "gallery.png").exists()
    assert "gallery" not in text.lower() and "Configuration" not in text
    assert "| image_retrieval_recall@1 | 0.5950 |" in text  # the last eval line stands in for eval.json
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    assert "No training metrics" in text and "No final metrics" in text and not (empty / "loss.png").exists()
    with pytest.raises(ValueError, match="fmt"):
        write_report(run, fmt="pdf")
    with pytest.raises(ValueError, match="not a directory"):
        write_report(tmp_path / "nope")


def test_compare_runs_table(tmp_path):
    a = _make_run(tmp_path / "infonce-b4", fields={"name": "infonce", "loss": "infonce", "batch_size": 4},
                  metrics={"image_retrieval_recall@1": 0.25, "acc1": 0.5})
    b = _make_run(tmp_path / "gamma-b4", metrics={"image_retrieval_recall@1": 0.375, "acc1": 0.625, "acc1_std": 0.01})
    c = _make_run(tmp_path / "no-eval", eval_json=False)
    table = compare_runs([a, b, c], ["image_retrieval_recall@1", "acc1"])
    lines = table.strip().splitlines()
    assert lines[0] == "| run | name | loss | batch_size | image_retrieval_recall@1 | acc1 |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| infonce-b4 | infonce | infonce | 4 | 0.2500 | 0.5000 |"
    assert lines[3] == "| gamma-b4 | gamma-b4 | gamma | 4 | 0.3750 | 0.6250 ± 0.0100 |"
    assert lines[4] == "| no-eval | - | - | - | 0.5950 | - |"
    assert len(lines) == 5
    everything = compare_runs([a, b]).strip().splitlines()
    assert everything[0] == "| run | name | loss | batch_size | image_retrieval_recall@1 | acc1 |"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert len(header) == len(set(header))
    with pytest.raises(ValueError, match="does not exist"):
        compare_runs([tmp_path / "missing"], ["acc1"])


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_compare_runs_does_not_repeat_the_run_name(tmp_path):
    # as small_batch.py names them: the eval.json name is the directory name
    a = _make_run(tmp_path / "gamma-b32", fields={"name": "gamma-b32", "loss": "gamma", "batch_size": 32},
                  metrics={"lp_acc1": 0.5}, gallery=False)
    b = _make_run(tmp_path / "infonce-b512", fields={"name": "infonce-b512", "loss": "infonce", "batch_size": 512},
                  metrics={"lp_acc1": 0.625}, gallery=False)
    lines = compare_runs([a, b], ["lp_acc1"]).strip().splitlines()
    assert _cells(lines[0]) == ["run", "loss", "batch_size", "lp_acc1"]
    assert _cells(lines[2]) == ["gamma-b32", "gamma", "32", "0.5000"]
    assert _cells(lines[3]) == ["infonce-b512", "infonce", "512", "0.6250"]
    for line in lines[2:]:
        assert _cells(line).count(_cells(line)[0]) == 1


def _write_jsonl(path, records, extra=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + extra)
    return path


TRAIN = [{"step": s, "epoch": (s - 1) // 10, "loss": 4.0 - s / 10, "lr": 1e-3, "logit_scale": 14.3, "samples_per_s": 500.0}
         for s in range(1, 31)]


def test_single_evaluation_is_a_table_not_a_plot(tmp_path):
    final = {"step": 30, "epoch": 2, "split": "eval", "text_retrieval_recall@1": 0.125, "image_retrieval_recall@1": 0.375,
             "lp_acc1": 0.5, "text_retrieval_median_rank": 7.0}
    run = _write_jsonl(tmp_path / "one-eval", [*TRAIN, final])
    (run / "eval.png").write_bytes(PNG)  # left by an earlier report
    text = write_report(run).read_text()
    assert not (run / "eval.png").exists() and "eval.png" not in text and "Evaluation during training" not in text
    assert "| metric | value |" in text
    for row in ("| text_retrieval_recall@1 | 0.1250 |", "| image_retrieval_recall@1 | 0.3750 |", "| lp_acc1 | 0.5000 |",
                "| text_retrieval_median_rank | 7.0000 |"):
        assert text.count(row) == 1
    assert "30 training records" in text

    # eval.json holding the same evaluation: still one table, no second copy
    (run / "eval.json").write_text(json.dumps({"dataset": "emoji", "metrics": {k: v for k, v in final.items()
                                                                                 if k not in ("step", "epoch", "split")}}))
    text = write_report(run).read_text()
    assert text.count("| lp_acc1 | 0.5000 |") == 1 and "## Evaluation\n" not in text

    # an eval.json that differs from the evaluation line: both tables, the line's labelled with its step
    (run / "eval.json").write_text(json.dumps({"metrics": {"lp_acc1": 0.75}}))
    text = write_report(run).read_text()
    assert "## Evaluation\n" in text and "(step 30, epoch 2)" in text
    assert "| lp_acc1 | 0.5000 |" in text and "| lp_acc1 | 0.7500 |" in text


def test_evaluation_curves_against_epoch_in_percent(tmp_path, monkeypatch):
    evals = [{"step": 10 * e, "epoch": e, "split": "eval", "text_retrieval_recall@1": r, "lp_acc1": a,
              "lp_acc1_std": 0.01, "text_retrieval_median_rank": 9.0 - e, "lp_log_loss": 0.5, "loss": 0.25}
             for e, r, a in ((1, 0.25, 0.5), (2, 0.5, 0.625), (3, 0.75, 0.875))]
    run = _write_jsonl(tmp_path / "curves", [*TRAIN, *evals])
    x, curves = eval_series(evals)
    assert x == "epoch"
    assert curves == {"text_retrieval_recall@1": {1: 0.25, 2: 0.5, 3: 0.75}, "lp_acc1": {1: 0.5, 2: 0.625, 3: 0.875}}

    drawn = _spy_on_figures(monkeypatch)
    text = write_report(run).read_text()
    assert "](eval.png)" in text and (run / "eval.png").read_bytes()[:8] == PNG
    assert "3 evaluations on the test split, at epoch 1, 2, 3;" in text
    assert drawn["eval.png"] == {"lp_acc1": ([1, 2, 3], [50.0, 62.5, 87.5]),
                                 "text_retrieval_recall@1": ([1, 2, 3], [25.0, 50.0, 75.0])}
    assert set(drawn["loss.png"]) == {"train loss", "eval loss"}  # eval loss on the loss panel, not in percent
    assert drawn["loss.png"]["eval loss"] == ([10, 20, 30], [0.25, 0.25, 0.25])
    assert drawn["loss.png"]["train loss"][0] == list(range(1, 31))


def test_staleness_panel_and_unknown_splits(tmp_path, monkeypatch):
    staleness = [{"step": 10 * e, "epoch": e, "split": "staleness", "staleness_log_error": -e / 4, "batch_log_error": e / 8}
                 for e in (1, 2, 3)]
    odd = [{"step": 30, "epoch": 3, "split": "mystery", "whatever": 1.0}, {"step": 30, "split": 7, "x": 1}]
    run = _write_jsonl(tmp_path / "stale", [*TRAIN, *staleness, *odd])
    train, evals = read_metrics(run)
    assert len(train) == 30 and evals == []

    drawn = _spy_on_figures(monkeypatch)
    text = write_report(run).read_text()
    assert "## Staleness" in text and "](staleness.png)" in text and (run / "staleness.png").read_bytes()[:8] == PNG
    assert drawn["staleness.png"] == {"staleness_log_error": ([1, 2, 3], [-0.25, -0.5, -0.75]),
                                      "batch_log_error": ([1, 2, 3], [0.125, 0.25, 0.375])}
    assert "30 training records" in text and "mystery" not in text and "eval.png" not in text


def test_evaluations_sharing_an_epoch(tmp_path):
    # train.py logs the end-of-training evaluation with the last epoch's index, the epoch of the one before
    evals = [{"step": s, "epoch": e, "split": "eval", "lp_acc1": v} for s, e, v in ((10, 1, 0.25), (20, 2, 0.5), (30, 2, 0.75))]
    run = _write_jsonl(tmp_path / "shared", [*TRAIN, *evals])
    assert eval_series(evals)[1] == {"lp_acc1": {1: 0.25, 2: 0.75}}
    text = write_report(run).read_text()
    assert ("2 evaluations on the test split, at epoch 1, 2 (1 more at an epoch already listed: the latest of each epoch "
            "is drawn)") in text


def test_report_draws_the_validation_curves_when_there_are_any(tmp_path):
    """Evaluations during training read the validation split; the final test evaluation is not on that curve."""
    run = tmp_path / "val"
    run.mkdir()
    lines = [{"step": 10 * e, "epoch": e, "loss": 1.0, "lr": 1e-3} for e in (1, 2, 3)]
    lines += [{"step": 10 * e, "epoch": e, "split": "validation", "lp_acc1": 0.5 + 0.1 * e} for e in (1, 2, 3)]
    lines += [{"step": 30, "epoch": 3, "split": "eval", "lp_acc1": 0.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = write_report(run).read_text()
    assert "3 evaluations on the validation split, at epoch 1, 2, 3;" in text
    assert (run / "eval.png").is_file()


def test_a_fusion_runs_loss_terms_are_drawn_beside_its_loss(tmp_path, monkeypatch):
    records = [{"step": k, "epoch": 0, "loss": 3.0 + k, "itc": 1.0, "itm": 0.5 + k, "mlm": 1.5} for k in (1, 2, 3)]
    run = _write_jsonl(tmp_path / "fusion", records)
    drawn = _spy_on_figures(monkeypatch)
    write_report(run)
    assert drawn["loss.png"]["itm"] == ([1, 2, 3], [1.5, 2.5, 3.5])
    assert set(drawn["loss.png"]) == {"train loss", "itc", "itm", "mlm"}


def test_fine_tuning_results_of_a_fusion_run_are_tabulated(tmp_path):
    run = _write_jsonl(tmp_path / "fusion", [{"step": 1, "epoch": 0, "loss": 3.0}])
    (run / "finetune-vqa").mkdir()
    (run / "finetune-vqa" / "finetune.json").write_text(json.dumps(
        {"task": "vqa", "steps": 528, "metrics": {"test_accuracy": 0.40125, "validation_accuracy": 0.5}}))
    (run / "finetune-reasoning").mkdir()
    (run / "finetune-reasoning" / "finetune.json").write_text("{torn")
    text = write_report(run).read_text()
    assert "## Fine-tuning" in text and "| vqa | 528 | 50.0 | 40.1 |" in text and "reasoning" not in text


def _spy_on_figures(monkeypatch) -> dict:
    """{file name: {line label: (x, y)}} of every figure the report saves (filled as it saves)."""
    drawn = {}
    save = report_module.save_figure

    def spy(figure, path, *args, **kwargs):
        drawn[Path(path).name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                  for ax in figure.axes for line in ax.get_lines()}
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(report_module, "save_figure", spy)
    return drawn
