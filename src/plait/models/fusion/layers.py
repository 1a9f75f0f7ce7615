"""BERT-style building blocks of the fusion model: attention, a post-norm layer with optional
cross-attention, token embeddings and the tied MLM head.

Post-norm (as BERT, so MiniLM's weights load unchanged); the layer with cross-attention is
ALBEF's fusion layer (its xbert.BertLayer with ``has_cross_attention``)::

    x <- LN(x + Attn(x, x; text mask))                      self-attention over text tokens
    x <- LN(x + Attn(x, image; image mask))                 cross-attention (fusion layers only)
    x <- LN(x + W2 GELU(W1 x))                              MLP, W1: D -> 4D (``intermediate``)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_NORM_EPS = 1e-12  # BERT's


class Attention(nn.Module):
    """Multi-head attention: queries from x (B, T, D), keys and values from ``context``
    (B, S, D_ctx; x itself when None); ``mask`` (B, S) bool, True where a key may be attended.
    softmax(Q K^T / sqrt(D / heads)) V, then the output projection: (B, T, D)."""

    def __init__(self, width: int, heads: int, context_width: int | None = None, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        context_width = context_width or width
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(context_width, width)
        self.value = nn.Linear(context_width, width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def _split(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))


class BertLayer(nn.Module):
    """One post-norm BERT layer (B, T, D) -> (B, T, D); with ``context_width`` it also
    cross-attends to a context (the image tokens, (B, S, context_width))."""

    def __init__(self, width: int, heads: int, intermediate: int, context_width: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.attention = Attention(width, heads, dropout=dropout)
        self.attention_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.cross_attention = Attention(width, heads, context_width, dropout) if context_width else None
        self.cross_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS) if context_width else None
        self.mlp = nn.Sequential(nn.Linear(width, intermediate), nn.GELU(), nn.Linear(intermediate, width))
        self.mlp_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        x = self.attention_norm(x + self.drop(self.attention(x, mask=mask)))
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("a fusion layer needs the image tokens (context=...)")
            x = self.cross_norm(x + self.drop(self.cross_attention(x, context, context_mask)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


class TextEmbeddings(nn.Module):
    """BERT's input embeddings: LN(word[id] + position[t] + segment), (B, T) -> (B, T, D).
    ``segment`` is the token-type-0 embedding (one segment, as every caption is)."""

    def __init__(self, vocab_size: int, width: int, max_length: int, dropout: float = 0.0):
        super().__init__()
        self.word = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_length, width))
        self.segment = nn.Parameter(torch.zeros(width))
        self.norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.word.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        with torch.no_grad():
            self.word.weight[0].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.position.shape[0]:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_length {self.position.shape[0]}")
        return self.drop(self.norm(self.word(ids) + self.position[: ids.shape[1]] + self.segment))


class MLMHead(nn.Module):
    """BERT's MLM head with its decoder tied to the word embeddings E (V, D):
    logits = LN(GELU(W h)) E^T + bias, (M, D) -> (M, V). E is passed in, so the head owns no copy."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=LAYER_NORM_EPS))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


def init_bert_(module: nn.Module) -> None:
    """BERT's initialisation at any width, in place: Linear weights ~ N(0, std^2) with
    std = 0.02 sqrt(768 / fan_in) (BERT-base's 0.02 at its width 768: the same gain per layer,
    where a fixed 0.02 at width 64 would shrink every layer's output 6x and make the [CLS]
    state of all captions nearly equal at init), biases 0, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02 * math.sqrt(768 / m.in_features))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
