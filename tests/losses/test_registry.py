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


def test_fill_is_passed_only_to_a_loss_that_takes_it():
    fill = {"dataset_size": 30, "seed": 3}
    assert isinstance(build_loss("clip", fill=fill), InfoNCELoss)  # takes neither: nothing passed
    gamma = build_loss("Decomposable", fill=fill, estimator="memory")
    assert isinstance(gamma, GammaContrastiveLoss) and gamma.estimator == "memory"
    sogclr = build_loss("sogclr", fill=fill)
    assert isinstance(sogclr, SogCLRLoss) and sogclr.dataset_size == 30
    assert build_loss("ntxent", fill=fill).mode == "unimodal"
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        build_loss("triplet", fill=fill)
