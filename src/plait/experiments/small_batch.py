"""The main job: on emoji, the decomposable loss at a small batch against InfoNCE at the same
small batch and at a large batch, same number of epochs; one comparison table and a report.

    plait experiment small-batch [--quick] [--out runs/small-batch] [key=value ...]
"""

from __future__ import annotations

import math
from pathlib import Path

from plait.config import load_config

RUNS = (("gamma", 32), ("infonce", 32), ("infonce", 512))
BASE_BATCH = 32
KEYS = ("text_retrieval_recall@1", "image_retrieval_recall@1", "text_retrieval_recall@5", "zeroshot_acc1", "lp_acc1", "knn_acc1")


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Learning rate for ``batch_size``: square-root scaling from the config's B = 32 value."""
    return base_lr * math.sqrt(batch_size / BASE_BATCH)


def quick_overrides() -> list[str]:
    return ["optim.max_steps=4", "optim.epochs=1", "eval.tasks=[retrieval,zero_shot,linear_probe]", "eval.gallery=4"]


def run_small_batch(out_dir: str | Path, quick: bool = False, overrides=(), progress: bool = True, config_name: str = "emoji") -> str:
    from plait.evaluate.report import compare_runs, write_report
    from plait.train import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = []
    for loss, batch_size in RUNS:
        base = load_config(config_name, list(overrides))
        run_dir = out / f"{loss}-b{batch_size}"
        settings = [
            f"loss.name={loss}", f"data.batch_size={batch_size}", f"optim.lr={scaled_lr(base.optim.lr, batch_size)}",
            f"output_dir={run_dir}", f"name={loss}-b{batch_size}", f"train.progress={progress}",
            "eval.tasks=[retrieval,zero_shot,linear_probe,knn]",
        ]
        config = load_config(config_name, [*settings, *(quick_overrides() if quick else []), *overrides])
        if run_dir.exists():
            for stale in ("metrics.jsonl", "checkpoint.pt"):
                (run_dir / stale).unlink(missing_ok=True)
        train(config)
        write_report(run_dir)
        run_dirs.append(run_dir)
    table = compare_runs(run_dirs, list(KEYS))
    lines = [
        "# Small batch, decomposable loss vs InfoNCE (emoji)", "",
        "`plait experiment small-batch`" + (" --quick" if quick else ""), "",
        "text_retrieval_recall@1 = image -> text R@1 on the test emoji; zeroshot_acc1 = Unicode group from",
        "prompted names; lp/knn = probes on the image embeddings.", "", table, "",
        *[f"- [{d.name}]({d.name}/report.md)" for d in run_dirs],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return table
