"""Contrastive losses: minibatch InfoNCE, the decomposable gamma loss, SogCLR, the full-data loss."""

from plait.losses.gamma import GammaContrastiveLoss
from plait.losses.generalized import generalized_contrastive_loss
from plait.losses.infonce import InfoNCELoss
from plait.losses.registry import build_loss
from plait.losses.sogclr import SogCLRLoss

__all__ = ["GammaContrastiveLoss", "InfoNCELoss", "SogCLRLoss", "build_loss", "generalized_contrastive_loss"]
