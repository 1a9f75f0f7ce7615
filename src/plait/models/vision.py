"""Image (and vector) towers small enough to train on two CPU cores."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from plait.models._blocks import pre_norm_encoder
from plait.models.encoder import ENCODERS, Encoder, check_heads_divide_width


@ENCODERS.register("mlp")
class MLPEncoder(Encoder):
    """Flatten, then Linear-GELU blocks: (B, ...) -> (B, out_dim). For vectors or tiny images;
    ``in_dim`` defaults to the number of values in one item's view."""

    modality = "tensor"
    size_options = ("in_dim", "out_dim")

    @classmethod
    def from_sample(cls, sample, options: dict) -> dict:
        if "in_dim" in options:
            return options
        if not isinstance(sample, torch.Tensor):
            raise ValueError("the mlp encoder takes tensors; use bow, transformer or minilm for text")
        return {**options, "in_dim": math.prod(sample.shape)}

    def __init__(self, in_dim: int, out_dim: int = 256, hidden: tuple[int, ...] = (512,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.LayerNorm(size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@ENCODERS.register("cnn")
class SmallCNN(Encoder):
    """Three conv-BN-GELU stages (widths w, 2w, 4w), each halving the resolution, then global
    average pooling and a linear layer: (B, 3, H, W) -> (B, out_dim)."""

    modality = "image"
    size_options = ("out_dim", "width", "in_channels")

    def __init__(self, out_dim: int = 256, width: int = 32, in_channels: int = 3):
        super().__init__()
        stages, channels = [], in_channels
        for factor in (1, 2, 4):
            stages += [
                nn.Conv2d(channels, width * factor, 3, padding=1, bias=False), nn.BatchNorm2d(width * factor), nn.GELU(),
                nn.Conv2d(width * factor, width * factor, 3, padding=1, bias=False), nn.BatchNorm2d(width * factor), nn.GELU(),
                nn.MaxPool2d(2),
            ]
            channels = width * factor
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@ENCODERS.register("vit")
class SmallViT(Encoder):
    """A small vision transformer: patches of ``patch`` pixels, a class token, pre-norm blocks:
    (B, 3, H, W) -> (B, out_dim) from the class token. ``image_size`` defaults to the data's."""

    modality = "image"
    size_options = ("image_size", "out_dim", "patch", "width", "heads")
    zero_size_options = ("depth",)

    @classmethod
    def from_sample(cls, sample, options: dict) -> dict:
        if "image_size" in options or not isinstance(sample, torch.Tensor):
            return options
        return {**options, "image_size": sample.shape[-1]}

    @classmethod
    def check_options(cls, options: dict, key: str) -> None:
        super().check_options(options, key)
        check_heads_divide_width(cls, options, key)

    def preprocessing(self) -> dict:
        return {"image_size": self.image_size}

    def __init__(self, image_size: int = 32, out_dim: int = 256, patch: int = 4, width: int = 128, depth: int = 4,
                 heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        tokens = (image_size // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = pre_norm_encoder(width, depth, heads, dropout)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.out_dim = out_dim
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        patches = self.patchify(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(patches), -1, -1), patches], dim=1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])
