"""Building blocks shared by the towers."""

from __future__ import annotations

from torch import nn


def pre_norm_encoder(width: int, depth: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    """``depth`` pre-norm transformer layers (batch first, GELU, MLP width 2 * ``width``)."""
    layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
