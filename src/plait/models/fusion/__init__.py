"""ALBEF-style fusion model: ViT tokens, BERT text layers, fusion layers with cross-attention,
ITC / ITM / MLM pre-training computed inside the model, and fine-tuning heads (docs/fusion.md)."""

from plait.models.fusion.encoders import FusionEncoder, ImageTokenEncoder, TextEncoder, init_from_minilm, minilm_weights
from plait.models.fusion.heads import TASK_CLASSES, FusionClassifier
from plait.models.fusion.model import LOSS_TERMS, FusionModel
from plait.models.fusion.objectives import (
                                            mask_tokens,
                                            momentum_itc_loss,
                                            negative_probabilities,
                                            same_caption,
                                            sample_hard_negatives,
)
from plait.models.fusion.presets import PRESETS, build_fusion_model, preset_options
from plait.models.fusion.queue import FeatureQueue

__all__ = [
    "FeatureQueue", "FusionClassifier", "FusionEncoder", "FusionModel", "ImageTokenEncoder", "LOSS_TERMS", "PRESETS",
    "TASK_CLASSES", "TextEncoder", "build_fusion_model", "init_from_minilm", "mask_tokens", "minilm_weights",
    "momentum_itc_loss", "negative_probabilities", "preset_options", "same_caption", "sample_hard_negatives",
]
