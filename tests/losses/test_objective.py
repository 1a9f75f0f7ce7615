"""The objective reads exactly the features each regulariser declares, and builds from a config."""

import pytest
import torch
import torch.nn.functional as F

from plait.config import load_config
from plait.losses import InfoNCELoss
from plait.losses.objective import ContrastiveObjective, build_objective
from plait.losses.regularizers import REGULARIZERS, Regularizer
from plait.types import PairFeatures


class SpreadOfB(Regularizer):
    """A test regulariser: the mean squared distance between b and its augmented view."""

    needs = ("b", "b_aug")

    def forward(self, b, b_aug):
        self.parts = {"spread": ((b - b_aug) ** 2).sum(-1).mean().detach()}
        return ((b - b_aug) ** 2).sum(-1).mean()


def _features(with_aug: bool = True) -> PairFeatures:
    torch.manual_seed(0)
    a, b = (F.normalize(torch.randn(6, 4), dim=-1) for _ in range(2))
    aug = F.normalize(b + 0.1 * torch.randn(6, 4), dim=-1) if with_aug else None
    return PairFeatures(a, b, torch.arange(6), torch.tensor(10.0), b_aug=aug)


def test_a_declared_regulariser_gets_its_fields_and_its_weighted_term_is_added():
    features = _features()
    objective = ContrastiveObjective(InfoNCELoss(), regularizers=[("spread", 0.5, SpreadOfB())])
    total = objective(features)
    base = InfoNCELoss()(features.a, features.b, features.logit_scale)
    spread = ((features.b - features.b_aug) ** 2).sum(-1).mean()
    assert float(total) == pytest.approx(float(base + 0.5 * spread), rel=1e-6)
    assert set(objective.stats) == {"base", "spread"} and objective.needs_augmented and not objective.needs_independent
    with pytest.raises(ValueError, match="spread needs the features b_aug, which were not computed"):
        objective(_features(with_aug=False))


def test_the_builtin_regularisers_declare_what_they_read():
    assert {name: cls.needs for name, cls in REGULARIZERS.items()} == {
        "separation": ("a", "b", "a_ind", "b_ind", "a_ind_aug", "b_ind_aug"),
        "bridge": ("a", "b", "a_aug"),
        "consistency": ("a", "b", "a_aug", "b_aug"),
    }


def test_build_objective_from_a_config():
    objective = build_objective(load_config("tiny", ["loss.name=sogclr", "loss.in_modal=true",
                                                     "regularizers=[{name: separation}, {name: bridge, weight: 0.3}]"]), 100)
    assert type(objective.base).__name__ == "SogCLRLoss" and objective.base.dataset_size == 100
    assert len(objective.in_modal) == 2 and objective.names == ["separation", "bridge"] and objective.weights == [0.1, 0.3]
    assert objective.needs_independent
    own = build_objective(load_config("fusion", ["loss.name=momentum_itc", "regularizers=[{name: consistency}]"]), 100)
    assert own.base is None and own.names == ["consistency"]
