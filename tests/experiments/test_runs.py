import json

from plait.experiments._runs import run_training


def _job(tmp_path, *extra):
    overrides = (f"output_dir={tmp_path / 'run'}", "eval.tasks=[retrieval]", *extra)
    return ("tiny", overrides, {"tag": 1})


def test_reuse_keeps_a_finished_run_of_the_same_config_and_retrains_a_changed_one(tmp_path):
    first = run_training(_job(tmp_path))
    assert first["tag"] == 1 and "reused" not in first
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())["metrics"]
    assert saved == first["metrics"]

    again = run_training(_job(tmp_path), reuse=True)
    assert again["reused"] is True and again["metrics"] == first["metrics"]

    changed = run_training(_job(tmp_path, "optim.lr=0.01"), reuse=True)
    assert "reused" not in changed and changed["seconds"] > 0
    assert run_training(_job(tmp_path, "optim.lr=0.01"), reuse=False).get("reused") is None
