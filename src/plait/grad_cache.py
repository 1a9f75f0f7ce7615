"""Gradient cache: a contrastive step over a large batch with the activation memory of one chunk.

GradCache (Gao, Zhang, Han, Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", RepL4NLP 2021). A contrastive loss L(z) couples every row of the batch, but the
encoder that makes z_i = f_theta(x_i) does not, so by the chain rule::

    dL/dtheta = sum_i (dL/dz_i)^T dz_i/dtheta = sum_chunks d/dtheta [ sum_{i in chunk} <z_i, g_i> ],
    g_i = dL/dz_i  (held constant)

Stage 1 computes every chunk's features without a graph, the loss on the (B, d) features
(leaves), and its gradient g wrt every feature field and the logit scale. Stage 2 recomputes
each chunk's features with a graph and back-propagates g through it. Peak activation memory is
one chunk's graph plus the (B, d) features and their gradients; the cost is one extra forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from plait._checks import is_int
from plait.models.contract import Batch, StepOutput, apply_objective

# Fields of the features that are not model outputs: the dataset indices and a momentum
# encoder's bank features (they come with the batch and carry no gradient to the parameters).
NOT_DIFFERENTIABLE = frozenset({"index", "a_bank", "b_bank"})
SCALE_FIELD = "logit_scale"


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of a batch: ``index``, ``a``, ``b``, ``a_aug``, ``b_aug`` (tensors or lists
    of strings), each tensor of ``bank``, and every value of ``extra`` whose length is B (a tensor
    with B rows or a list of B items); other ``extra`` values are passed on whole."""
    size = len(batch.index)

    def rows(x: Any) -> Any:
        return None if x is None else x[start:stop]

    def extra_rows(x: Any) -> Any:
        if (torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == size) or (isinstance(x, (list, tuple)) and len(x) == size):
            return x[start:stop]
        return x

    bank = None if batch.bank is None else tuple(rows(z) for z in batch.bank)
    return Batch(rows(batch.index), rows(batch.a), rows(batch.b), rows(batch.a_aug), rows(batch.b_aug), bank,
                 {key: extra_rows(value) for key, value in batch.extra.items()})


def chunk_bounds(size: int, chunk: int) -> list[tuple[int, int]]:
    """[(0, chunk), (chunk, 2 chunk), ..., (k chunk, size)]: the last chunk may be shorter."""
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def _tensor_fields(features: Any) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every tensor field of a features dataclass (PairFeatures); None skipped."""
    for field in dataclasses.fields(features):
        value = getattr(features, field.name)
        if torch.is_tensor(value):
            yield field.name, value


def concat_features(parts: list[Any]) -> Any:
    """One features object from the chunks': each (b_k, ...) field concatenated along rows into
    (B, ...); a scalar field (the logit scale, the same in every chunk) taken from the first
    chunk; a field that is None (or not a tensor) in the first chunk kept as the first chunk's."""
    joined = {}
    for name, value in _tensor_fields(parts[0]):
        joined[name] = value if value.dim() == 0 else torch.cat([getattr(p, name) for p in parts])
    return dataclasses.replace(parts[0], **joined)


def _as_leaves(features: Any) -> Any:
    """The features with every differentiable floating field a fresh leaf requiring grad."""
    leaves = {name: value.detach().requires_grad_(True) for name, value in _tensor_fields(features)
              if name not in NOT_DIFFERENTIABLE and value.is_floating_point()}
    return dataclasses.replace(features, **leaves)


def _detached(features: Any) -> Any:
    return dataclasses.replace(features, **{name: value.detach() for name, value in _tensor_fields(features)})


class RngState:
    """The global CPU generator's state and, when CUDA is initialised, every CUDA device's;
    ``capture()`` then ``restore()`` replays the same random draws (dropout masks)."""

    def __init__(self, cpu: Tensor, cuda: list[Tensor] | None):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _cached_features(features_fn: Callable[[Batch], Any], chunks: list[Batch]) -> tuple[Any, list[RngState]]:
    """Stage 1: every chunk's features under no_grad, concatenated to (B, d) fields; and the random
    state before each chunk's forward pass."""
    states, parts = [], []
    with torch.no_grad():
        for sub in chunks:
            states.append(RngState.capture())
            parts.append(features_fn(sub))
    return concat_features(parts), states


def _chunk_backward(features: Any, grads: dict[str, Tensor], start: int, stop: int, with_scale: bool) -> None:
    """Stage 2 for one chunk: back-propagate the cached gradients of rows [start, stop),
    i.e. the gradient of sum_fields <f_chunk, g[start:stop]> (+ scale * g_scale if ``with_scale``)."""
    outputs, cotangents = [], []
    for name, value in _tensor_fields(features):
        grad = grads.get(name)
        if grad is None or not value.requires_grad:  # unused by the loss, or constant (a frozen tower)
            continue
        if value.dim() == 0:
            if not with_scale:
                continue
            outputs.append(value)
            cotangents.append(grad)
        else:
            outputs.append(value)
            cotangents.append(grad[start:stop])
    if outputs:
        torch.autograd.backward(outputs, cotangents)


def grad_cache_step(features_fn: Callable[[Batch], Any], batch: Batch, objective: nn.Module, chunk: int, *,
                    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    scale_loss: Callable[[Tensor], Tensor] = lambda loss: loss) -> StepOutput:
    """A contrastive step whose encoders run ``chunk`` rows at a time; backward is DONE here.

    ``features_fn(sub_batch) -> PairFeatures`` is the model's ``contrastive_features`` (under DDP a
    function calling the wrapped module); ``batch`` a contract Batch of B rows; ``objective`` the
    contrastive objective (called exactly once, on all B rows, so a stateful loss, the gamma loss
    or SogCLR, writes its per-sample state once, as in the plain step).

    - Stage 1: z = concat_k features_fn(chunk_k) under no_grad ((B, d) fields; the logit scale s,
      a scalar, from the first chunk), made leaves; L = objective(z); ``scale_loss(L).backward()``
      gives g = dL/dz per field and g_s = dL/ds.
    - Stage 2: for each chunk k, recompute z_k = features_fn(chunk_k) with a graph and back-propagate
      g[rows of k] through it (the gradient of sum_fields <z_k, g_k>); the scale's term s * g_s is
      added once, in the last chunk, so that the last (synchronised) backward reaches every
      parameter. The parameter gradients accumulate into ``.grad`` as ``loss.backward()`` would:
      zero them before the call. They equal the plain step's (``objective(contrastive_features(batch))``
      then backward) up to rounding, for models without batch-dependent layers.

    ``chunk >= B`` is the plain step itself (one forward, one backward).

    Returns ``StepOutput(L.detach(), objective.stats, features)``, ``features`` the stage-1 features
    (detached). The caller must NOT call backward on the loss: it is already done (and detached).

    - **BatchNorm** (or any layer mixing rows) in training mode computes its statistics per chunk,
      not over the batch, and updates its running statistics once per chunk per pass (twice per
      chunk in all: stage 1 and stage 2); the result then differs from a plain step.
    - **Random state**: the global CPU generator's state (and every CUDA device's, if CUDA is
      initialised) is saved before each chunk's stage-1 forward and restored before its stage-2
      recompute, so dropout draws the same masks in both passes (masks drawn per chunk, so not the
      plain step's masks over the whole batch). At the end the generators are set to where they
      stood after the objective: the step has consumed one forward pass's worth of draws and the
      objective's, as a plain step does. Other generators (the gamma loss's own) are untouched.
    - **DDP**: the backward of every chunk but the last runs inside ``no_sync()`` (pass the wrapped
      module's ``no_sync``), so gradients are all-reduced once, on the last backward, which reaches
      every parameter (it carries the logit-scale term). Stage 1 runs under no_grad, where DDP sets
      up no reduction. Under torchrun ``apply_objective`` gathers the features of every rank
      (with gradient), so the cached gradients are those of the global loss.
    - **Mixed precision**: call it outside the autocast region with a ``features_fn`` that enters
      it (the trainer's does), so that the backward passes run outside it as a plain step's do;
      the objective runs in float32
      (``apply_objective``); with fp16 pass ``scale_loss=scaler.scale``: the cached gradients, and so
      the parameter gradients, are then scaled (unscale them before clipping, as the trainer does).
    """
    if not (is_int(chunk) and chunk >= 1):
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    size = len(batch.index)
    if chunk >= size:
        features = features_fn(batch)
        loss = apply_objective(objective, features)
        scale_loss(loss).backward()
        return StepOutput(loss.detach(), dict(getattr(objective, "stats", {})), _detached(features))
    bounds = chunk_bounds(size, chunk)
    chunks = [slice_batch(batch, start, stop) for start, stop in bounds]
    cached, states = _cached_features(features_fn, chunks)
    leaves = _as_leaves(cached)
    loss = apply_objective(objective, leaves)
    scale_loss(loss).backward()
    after = RngState.capture()  # where a plain step leaves the generators: after forward and objective
    grads = {name: value.grad for name, value in _tensor_fields(leaves) if value.grad is not None}
    last = len(chunks) - 1
    for k, ((start, stop), sub, state) in enumerate(zip(bounds, chunks, states)):
        state.restore()
        with no_sync() if k < last else contextlib.nullcontext():
            _chunk_backward(features_fn(sub), grads, start, stop, with_scale=k == last)
    after.restore()
    return StepOutput(loss.detach(), dict(getattr(objective, "stats", {})), _detached(leaves))
