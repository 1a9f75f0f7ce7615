import pytest

from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss, build_loss


def test_builds_each_loss_by_name():
    assert isinstance(build_loss("infonce", temperature=0.2), InfoNCELoss)
    assert build_loss("ntxent").mode == "unimodal"
    assert build_loss("clip").mode == "bimodal"
    gamma = build_loss("gamma", dataset_size=30, estimator="memory", shape=2.0)
    assert isinstance(gamma, GammaContrastiveLoss) and gamma.estimator == "memory" and gamma.shape == 2.0
    assert isinstance(build_loss("SogCLR", dataset_size=30, gamma=0.5), SogCLRLoss)


def test_unknown_name_or_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown loss 'triplet'.*gamma.*infonce.*sogclr"):
        build_loss("triplet")
    with pytest.raises(ValueError, match="no option 'estimatr'.*estimator"):
        build_loss("gamma", dataset_size=10, estimatr="ema")
