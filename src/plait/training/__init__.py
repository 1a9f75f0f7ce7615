"""Training: a run built from a config, one loop, and the small parts it is made of.

- ``build``: every part a config names (:class:`RunParts`), in the order that fixes the random draws;
- ``batches``: views on the device, augmentation and second views (:class:`BatchPreparer`);
- ``step``: the forward/backward pass and one optimizer step (:class:`OptimizerStep`: unscale,
  clip, finite check, update, lr schedule);
- ``callbacks``: what a model or a loss needs from the loop (bank refresh, momentum bank, the
  model's after-step update, staleness log), chosen from their declared capabilities;
- ``faults``: the policy for a step that cannot be taken (stop, or skip);
- ``metrics``: ``metrics.jsonl`` and the loss window between log lines;
- ``state``: what a checkpoint holds, its checks, and restoring it; ``resume``: resuming a run;
- ``evaluation``: the periodic and the final evaluation;
- ``trainer``: :class:`Trainer`, the loop as a thin façade over these, and :func:`train`.
"""

from plait.training.batches import RANK_SEED_STRIDE, BatchPreparer
from plait.training.build import RunParts, build_run
from plait.training.callbacks import Callback, CandidateRefresh, ModelAfterStep, MomentumBank, StalenessLog, default_callbacks
from plait.training.faults import MAX_CONSECUTIVE_SKIPS, FaultPolicy, StepFault
from plait.training.metrics import LossWindow, MetricsLog
from plait.training.resume import data_fingerprint
from plait.training.step import OptimizerStep, StepResult, forward_backward
from plait.training.trainer import Trainer, train

__all__ = [
    "MAX_CONSECUTIVE_SKIPS", "RANK_SEED_STRIDE", "BatchPreparer", "Callback", "CandidateRefresh", "FaultPolicy", "LossWindow",
    "MetricsLog", "ModelAfterStep", "MomentumBank", "OptimizerStep", "RunParts", "StalenessLog", "StepFault", "StepResult",
    "Trainer", "build_run", "data_fingerprint", "default_callbacks", "forward_backward", "train",
]
