import base64
import json
import re

import numpy as np
import pytest

from plait.evaluate import compare_runs, write_report
from plait.evaluate.report import read_gallery

PNG = b"\x89PNG\r\n\x1a\n"


def _make_run(path, *, eval_json=True, gallery=True, config=True, metrics=None, fields=None):
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "epoch": s // 50, "loss": 5.0 / (1 + s / 20), "lr": 1e-3, "samples_per_s": 900.0}) for s in range(120)]
    lines += [json.dumps({"step": s, "split": "eval", "image_retrieval_recall@1": s / 200, "text_retrieval_median_rank": 7.0}) for s in (40, 80, 119)]
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
    for picture in ("loss.png", "gallery.png"):
        assert f"]({picture})" in text
        assert (run / picture).stat().st_size > 1000 and (run / picture).read_bytes()[:8] == PNG
    assert "| image_retrieval_recall@1 | 0.4321 |" in text
    assert "| acc1 | 0.8765 ± 0.0123 |" in text and "acc1_std" not in text
    assert "toy-coco" in text and "gamma-b4" in text
    assert "dim: 64" in text and "# the decomposable one" in text and "<details>" in text
    assert "for 2 of 3 queries" in text
    assert "120 training records" in text


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
    assert len(images) == 2 and all(base64.b64decode(data)[:8] == PNG for data in images)
    assert "loss.png'" not in text and "gallery.png'" not in text
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
    with pytest.raises(ValueError, match="does not exist"):
        compare_runs([tmp_path / "missing"], ["acc1"])
