"""A run's evaluations: the periodic one during training (the validation split if there is one)
and the final one after the last step (``eval.split``), written to ``eval.json``.

The final one runs on rank 0 after the checkpoint and the exported weights are saved; it is
skipped, with a note in ``eval.json`` and on stderr, when the test split it reads is empty (user
data without a test file or fraction).
"""

from __future__ import annotations

import json
import sys

from plait import distributed
from plait.atomic import atomic_write_text


def has_split(trainer, on: str) -> bool:
    """Whether the split an evaluation reads has items (user data may have no test split)."""
    return on == "validation" or len(trainer.test_set) > 0


def info(trainer, on: str) -> dict:
    """What ``eval.json`` says of the run beside its metrics."""
    config = trainer.config
    return {"name": config.name, "dataset": config.data.name, "loss": config.loss.name, "batch_size": config.data.batch_size,
            "steps": trainer.step, "split": "validation" if on == "validation" else "test"}


def evaluate(trainer, write: bool, on: str = "test") -> dict:
    """Metrics on the validation split (``on="validation"``) or the test split (``eval.json``
    and ``gallery.npz`` written with ``write``)."""
    from plait.evaluate.suite import evaluate_model

    target = trainer.validation_set if on == "validation" else trainer.test_set
    return evaluate_model(trainer.model, trainer.train_set, target, trainer.config.eval, trainer.device,
                          run_dir=trainer.run_dir if write else None, info=info(trainer, on))


def finish(trainer) -> dict:
    """Save, export and run the final evaluation; every rank returns rank 0's metrics."""
    trainer.save()
    metrics = _final_evaluation(trainer) if trainer.is_main else None
    if trainer.world_size > 1:
        metrics = distributed.all_objects(metrics)[0]
    return metrics


def _final_evaluation(trainer) -> dict:
    config = trainer.config
    trainer.export()
    on = config.eval.split
    metrics = evaluate(trainer, write=True, on=on) if has_split(trainer, on) else None
    if trainer.validation_set is not None and on == "test" and config.train.eval_every_epochs:
        # the last point of the validation curve, beside the final test evaluation
        trainer.log({"step": trainer.step, "epoch": trainer.epoch, "split": "validation",
                     **evaluate(trainer, write=False, on="validation")})
    if metrics is None:
        note = "no test split (set data.options.test_fraction > 0 or a test file, or use eval.split=validation)"
        print(f"plait: note: the final evaluation was skipped: {note}", file=sys.stderr)
        atomic_write_text(trainer.run_dir / "eval.json",
                          json.dumps({**info(trainer, on), "skipped": note, "metrics": {}}, indent=1))
        metrics = {}
    else:
        trainer.log({"step": trainer.step, "epoch": trainer.epoch, "split": "eval" if on == "test" else "validation", **metrics})
    trainer.metrics.close()
    return metrics
