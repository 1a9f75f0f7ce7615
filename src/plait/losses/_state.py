"""Per-sample state addressed by dataset index, shared by the losses that keep one.

The state lives in registered buffers, so ``state_dict()`` holds it and checkpoints restore it:

- ``log_z``      (2, N) float32: log of the per-item rate estimate, one row per direction
                  (0: anchors from ``features_a``, 1: anchors from ``features_b``);
- ``visits``     (N,) int64: how many training batches each item has been in;
- ``last_step``  (N,) int64: the step of its latest visit (-1: never);
- ``step``       () int64: training steps taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plait._checks import is_int
from plait.losses._batch import PairBatch
from plait.losses._inputs import check_index, prepare_pair, resolve_scale
from plait.losses.base import ContrastiveLoss


class PerSampleState(ContrastiveLoss):
    """Base of the losses with per-sample state (the gamma loss, SogCLR): the buffers above, the
    index checks and the duplicate-index reduction they share."""

    def __init__(self, dataset_size: int):
        super().__init__()
        if not (is_int(dataset_size) and dataset_size >= 2):
            raise ValueError(f"dataset_size must be an integer >= 2, got {dataset_size!r}")
        self.dataset_size = dataset_size
        self.register_buffer("log_z", torch.zeros(2, dataset_size))
        self.register_buffer("visits", torch.zeros(dataset_size, dtype=torch.long))
        self.register_buffer("last_step", torch.full((dataset_size,), -1, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.stats: dict[str, Tensor] = {}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "log_z")
        if saved is not None and saved.shape != self.log_z.shape:
            saved_size = saved.shape[-1] if saved.dim() == 2 else tuple(saved.shape)
            raise ValueError(
                f"{type(self).__name__} state was saved for dataset_size={saved_size}, but this loss "
                f"has dataset_size={self.dataset_size}; build the loss with the dataset it was trained on"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @property
    def candidate_count(self) -> int:
        """Candidates per anchor in the generalised loss: N (bimodal) or 2N - 1 (unimodal).
        Subclasses set ``mode``, ``normalize`` and ``temperature``."""
        return self.dataset_size if self.mode == "bimodal" else 2 * self.dataset_size - 1

    def prepare_batch(self, features_a: Tensor, features_b: Tensor, index: Tensor, logit_scale: Tensor | float | None,
                      chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor, PairBatch]:
        """(a, b, scale, batch): the checked (upcast, normalised) features, the logit scale and
        the batch's logits, after checking the index and the state's device. With ``chunk_size``
        the logits are left to ``chunk_size``-row blocks (never formed) past the dense size
        (``plait.losses._logsumexp.use_chunks``)."""
        from plait.losses._logsumexp import use_chunks

        a, b = prepare_pair(features_a, features_b, self.normalize)
        self.check_device(a.device)
        index = check_index(index, a.shape[0], self.dataset_size, a.device)
        scale = resolve_scale(logit_scale, self.temperature, a)
        n_rows = a.shape[0] if self.mode == "bimodal" else 2 * a.shape[0]
        chunk = chunk_size if use_chunks(n_rows, chunk_size) else None
        return a, b, scale, PairBatch.build(a, b, scale, index, self.mode, chunk_size=chunk)

    def check_device(self, device: torch.device) -> None:
        if self.log_z.device != device:
            raise ValueError(
                f"{type(self).__name__} keeps its per-sample state on {self.log_z.device} but the features are on "
                f"{device}; move the loss with loss.to({str(device)!r})"
            )

    def reduce_duplicates(self, unique: Tensor, inverse: Tensor, values: Tensor, log_space: bool) -> Tensor:
        """Average ``values`` (..., B) over the rows sharing a dataset index -> (..., U).

        ``log_space=True`` averages exp(values) and returns the log (log-mean-exp).
        """
        if unique.numel() == inverse.numel():
            order = torch.empty_like(inverse)
            order[inverse] = torch.arange(inverse.numel(), device=inverse.device)
            return values[..., order]
        member = inverse[None, :] == torch.arange(unique.numel(), device=inverse.device)[:, None]  # (U, B)
        count = member.sum(dim=1).to(values.dtype)
        if log_space:
            masked = values.unsqueeze(-2).masked_fill(~member, float("-inf"))  # (..., U, B)
            return torch.logsumexp(masked, dim=-1) - count.log()
        return (values.unsqueeze(-2) * member.to(values.dtype)).sum(dim=-1) / count

    def record_visit(self, unique: Tensor) -> None:
        """Count one visit of each item in ``unique`` at the next step (training mode only)."""
        self.step += 1
        self.visits[unique] += 1
        self.last_step[unique] = self.step

    def state_age(self, index: Tensor) -> Tensor:
        """Steps since each row's item was last visited, counting the current one (0: never)."""
        last = self.last_step[index]
        return torch.where(last >= 0, self.step + 1 - last, torch.zeros_like(last))
