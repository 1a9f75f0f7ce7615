"""The generalised (full-data) contrastive loss: every dataset item is a candidate."""

from __future__ import annotations

import torch
from torch import Tensor

from plait.losses._batch import PairBatch
from plait.losses._inputs import check_mode, check_temperature, prepare_pair, resolve_scale


def generalized_contrastive_loss(
    features_a: Tensor,
    features_b: Tensor,
    logit_scale: Tensor | float | None = None,
    *,
    temperature: float = 0.1,
    mode: str = "bimodal",
    normalize: bool = True,
) -> Tensor:
    """Full-data loss that the decomposable loss optimises without bias (DESIGN.md section 1).

    ``features_a``, ``features_b`` (N, d) hold the *whole dataset*; with s_ij = scale * <a_i, b_j>
    (``logit_scale``, third positional as in every plait loss, else 1 / ``temperature``)::

        l_i = -s_ii + log Z_i,     Z_i = 1/N sum_j exp(s_ij)       (bimodal, both directions averaged)

    In unimodal mode each of the 2N views contrasts with the 2N - 1 others (Z_i = 1/(2N-1) sum).
    Equal to InfoNCE on the full data minus log N (bimodal) or log(2N - 1) (unimodal).
    Returns a scalar.
    """
    check_mode(mode)
    a, b = prepare_pair(features_a, features_b, normalize)
    scale = resolve_scale(logit_scale, check_temperature(temperature), a)
    index = torch.arange(a.shape[0], device=a.device)
    batch = PairBatch.build(a, b, scale, index, mode)
    n = a.shape[0] if mode == "bimodal" else 2 * a.shape[0] - 1
    return (-batch.positive + batch.log_partition(1.0 / n, (n - 1.0) / n)).mean()
