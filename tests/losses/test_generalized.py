import math

import pytest
import torch

from plait.losses import InfoNCELoss, generalized_contrastive_loss
from tests.losses.reference import generalized_loop


@pytest.mark.parametrize("mode", ["bimodal", "unimodal"])
@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_matches_brute_force_loop(mode, temperature):
    a, b = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    got = generalized_contrastive_loss(a, b, temperature=temperature, mode=mode)
    assert got.item() == pytest.approx(generalized_loop(a, b, temperature, mode).item(), abs=1e-9)


@pytest.mark.parametrize("mode,offset", [("bimodal", lambda n: math.log(n)), ("unimodal", lambda n: math.log(2 * n - 1))])
def test_is_full_batch_infonce_minus_log_candidates(mode, offset):
    a, b = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    full = InfoNCELoss(temperature=0.2, mode=mode)(a, b)
    assert generalized_contrastive_loss(a, b, temperature=0.2, mode=mode).item() == pytest.approx(full.item() - offset(11),
                                                                                                  abs=1e-9)
