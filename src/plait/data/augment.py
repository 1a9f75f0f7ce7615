"""Positive pairs by augmentation: batched image transforms (kornia) and EDA-style text edits.

Both are deterministic under a seed and resumable: ``get_state()`` returns a picklable state and
``set_state(state)`` continues exactly where it was taken, so a resumed run sees the same views.

Synonym source for :class:`TextAugment`. None of the installed packages bundles WordNet or a
thesaurus (the PyPI packages that do, e.g. nltk data wheels or ``wn``, are not dependencies of
plait and ``wn`` downloads its data at run time), so the default table is built offline from
data already installed:

1. the ``emoji`` package's names and aliases: two names of the same emoji that differ in exactly
   one word make that word pair synonyms ("automobile"/"car", "phone"/"telephone",
   "crow"/"raven", "female"/"woman"); likewise two one-word names of one emoji. Only alphabetic
   words of 3+ letters that are not stop words are kept, pairs are not chained, and a listed
   few that only hold inside their emoji ("bride"/"woman", "cooking"/"egg") are dropped
   (``EXCLUDED_PAIRS``): 55 pairs with emoji 2.16.
2. a short hand-written list of general caption words (``GENERAL_SYNONYMS``: photo/picture/
   image, digit/number/numeral, small/little, ...), so the prompts of the embedded datasets
   have synonyms too.

Pass ``synonyms={word: [synonyms]}`` to use your own table (``default_synonyms()`` returns the
built-in one, to extend it).
"""

from __future__ import annotations

import math
import random
import string
from functools import lru_cache

import torch
from torch import Tensor, nn

from plait._checks import is_int
from plait.registry import Registry

STOP_WORDS = frozenset(
    "a an the of on in at to for with and or but is are be by as from into onto it its this that "
    "these those his her their our your my me you he she we they them up down out off over under "
    "no not so very".split()
)

# Emoji-name pairs that are not synonyms outside their emoji (or are vulgar), left out.
EXCLUDED_PAIRS = frozenset(
    tuple(sorted(p.split("/")))
    for p in "accommodation/bed athletic/running ballot/check bride/woman calendar/date care/polish "
    "clamp/compression cooking/egg ear/sheaf frames/strip gorilla/harambe hankey/poop hankey/shit "
    "poop/shit heavy/red laughing/satisfied mandarin/orange memo/pencil moai/moyai probing/white "
    "scream/weary".split()
)

GENERAL_SYNONYMS = [
    ("photo", "picture", "image"),
    ("digit", "number", "numeral"),
    ("handwritten", "hand-drawn"),
    ("drawing", "sketch"),
    ("icon", "symbol", "sign"),
    ("emoji", "emoticon"),
    ("small", "little", "tiny"),
    ("big", "large"),
    ("happy", "joyful", "glad"),
    ("sad", "unhappy"),
    ("smiling", "grinning"),
    ("man", "male"),
    ("woman", "female"),
    ("person", "individual"),
    ("light", "pale"),
    ("dark", "deep"),
    ("button", "key"),
    ("arrow", "pointer"),
    ("house", "home"),
    ("car", "automobile"),
]


def _is_word(word: str) -> bool:
    return len(word) >= 3 and word.replace("-", "").isalpha() and word.isascii() and word not in STOP_WORDS


@lru_cache(maxsize=1)
def _emoji_pairs() -> tuple[tuple[str, str], ...]:
    try:
        import emoji as emoji_package
    except ImportError:  # the table then holds the general list only
        return ()

    def clean(name: str) -> list[str]:
        return name.strip(":").replace("_", " ").lower().split()

    pairs = set()
    for info in emoji_package.EMOJI_DATA.values():
        names = list(dict.fromkeys(" ".join(clean(n)) for n in [info.get("en", ""), *info.get("alias", [])] if n))
        for k, first in enumerate(names):
            for second in names[k + 1 :]:
                a, b = first.split(), second.split()
                if len(a) != len(b):
                    continue
                diff = [(x, y) for x, y in zip(a, b) if x != y]
                if len(diff) == 1 and _is_word(diff[0][0]) and _is_word(diff[0][1]):
                    pair = tuple(sorted(diff[0]))
                    if pair not in EXCLUDED_PAIRS:
                        pairs.add(pair)
    return tuple(sorted(pairs))


def default_synonyms() -> dict[str, list[str]]:
    """The built-in table word -> synonyms (see the module docstring for its sources)."""
    table: dict[str, set[str]] = {}
    for group in GENERAL_SYNONYMS:
        for word in group:
            table.setdefault(word, set()).update(w for w in group if w != word)
    for a, b in _emoji_pairs():
        table.setdefault(a, set()).add(b)
        table.setdefault(b, set()).add(a)
    return {word: sorted(words) for word, words in sorted(table.items())}


def _check_probability(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


class TextAugment:
    """EDA (Wei & Zou, 2019) on captions, plus swapping in an alternative caption.

    For a caption of l words, in this order (each step's count n = floor(p * l + u), u ~ U(0, 1),
    so short captions are changed with probability p * l rather than always):

    0. with probability ``p_alternative``, the caption becomes one of the item's ``alternatives``;
    1. synonym replacement: n words (not stop words, with a synonym) get a random synonym;
    2. random insertion: n times, a synonym of a random word goes to a random position;
    3. random swap: n times, two random words trade places;
    4. random deletion: each word is dropped with probability ``p_delete`` (one word always stays).

    ``__call__(texts, alternatives=None) -> list[str]``, one augmented caption per text.
    """

    def __init__(
        self,
        p_delete: float = 0.1,
        p_swap: float = 0.1,
        p_insert: float = 0.1,
        p_synonym: float = 0.1,
        p_alternative: float = 0.2,
        seed: int = 0,
        synonyms: dict[str, list[str]] | None = None,
    ):
        self.p_delete = _check_probability("p_delete", p_delete)
        self.p_swap = _check_probability("p_swap", p_swap)
        self.p_insert = _check_probability("p_insert", p_insert)
        self.p_synonym = _check_probability("p_synonym", p_synonym)
        self.p_alternative = _check_probability("p_alternative", p_alternative)
        table = default_synonyms() if synonyms is None else synonyms
        self.synonyms = {str(k).lower(): [s for s in v if s and s.lower() != str(k).lower()] for k, v in table.items()}
        self.seed = seed
        self._rng = random.Random(seed)

    def get_state(self) -> dict:
        return {"seed": self.seed, "rng": self._rng.getstate()}

    def set_state(self, state: dict) -> None:
        self.seed = state["seed"]
        self._rng.setstate(state["rng"])

    def __call__(self, texts: list[str], alternatives: list[list[str]] | None = None) -> list[str]:
        if isinstance(texts, str):
            raise ValueError("texts must be a list of captions, got a single string")
        if alternatives is not None and len(alternatives) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(alternatives)} lists of alternatives")
        out = []
        for n, text in enumerate(texts):
            options = alternatives[n] if alternatives is not None else None
            if options and self.p_alternative > 0 and self._rng.random() < self.p_alternative:
                text = self._rng.choice(options)
            out.append(self.augment(text))
        return out

    def augment(self, text: str) -> str:
        words = text.split()
        if not words:
            return text
        words = self._replace(words, self._count(self.p_synonym, len(words)))
        words = self._insert(words, self._count(self.p_insert, len(words)))
        words = self._swap(words, self._count(self.p_swap, len(words)))
        words = self._delete(words)
        return " ".join(words)

    def _count(self, p: float, length: int) -> int:
        return math.floor(p * length + self._rng.random()) if p > 0 else 0

    def _synonyms_of(self, word: str) -> list[str]:
        key = word.lower().strip(string.punctuation)
        return [] if key in STOP_WORDS else self.synonyms.get(key, [])

    def _replace(self, words: list[str], count: int) -> list[str]:
        if count == 0:
            return words
        candidates = [k for k, w in enumerate(words) if self._synonyms_of(w)]
        self._rng.shuffle(candidates)
        words = list(words)
        for k in candidates[:count]:
            word = words[k]
            core = word.strip(string.punctuation)
            start = word.find(core) if core else 0
            replacement = self._rng.choice(self._synonyms_of(word))
            words[k] = word[:start] + replacement + word[start + len(core) :]
        return words

    def _insert(self, words: list[str], count: int) -> list[str]:
        words = list(words)
        for _ in range(count):
            candidates = [w for w in words if self._synonyms_of(w)]
            if not candidates:
                break
            synonym = self._rng.choice(self._synonyms_of(self._rng.choice(candidates)))
            words.insert(self._rng.randint(0, len(words)), synonym)
        return words

    def _swap(self, words: list[str], count: int) -> list[str]:
        words = list(words)
        if len(words) < 2:
            return words
        for _ in range(count):
            i, j = self._rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
        return words

    def _delete(self, words: list[str]) -> list[str]:
        if self.p_delete == 0 or len(words) < 2:
            return words
        kept = [w for w in words if self._rng.random() >= self.p_delete]
        return kept if kept else [self._rng.choice(words)]


class _SeededModule(nn.Module):
    """An augmentation module with its own seeded generator, saved and restored as state."""

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def get_state(self) -> dict:
        return {"seed": self.seed, "generator": self._generator.get_state()}

    def set_state(self, state: dict) -> None:
        self.seed = state["seed"]
        self._generator.set_state(state["generator"])


class ImageAugment(_SeededModule):
    """SimCLR-style batch augmentation with kornia: (B, 3, H, W) in [0, 1] -> (B, 3, S, S).

    RandomResizedCrop(S, ``crop_scale``) -> RandomHorizontalFlip(p=``flip``) ->
    ColorJitter(brightness, contrast, saturation = ``jitter_strength``, hue =
    ``jitter_strength`` / 4, p=``jitter``) -> RandomGaussianBlur(kernel ~ S / 10 (odd, >= 3),
    sigma in (0.1, 2.0), p=``blur``); the result is clamped to [0, 1]. A (3, H, W) image is
    treated as a batch of one. Runs on the input's device.

    kornia draws from torch's global RNG; each call here runs inside ``torch.random.fork_rng``
    seeded from the module's own generator, so the global RNG is left untouched and two modules
    with the same ``seed`` give the same outputs for the same input sequence.
    """

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        flip: float = 0.5,
        jitter: float = 0.4,
        blur: float = 0.2,
        seed: int = 0,
        jitter_strength: float = 0.4,
    ):
        super().__init__()
        import kornia.augmentation as K

        if not (is_int(image_size) and image_size >= 1):
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        low, high = crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
        for name, value in (("flip", flip), ("jitter", jitter), ("blur", blur)):
            _check_probability(name, value)
        if jitter_strength < 0:
            raise ValueError(f"jitter_strength must be >= 0, got {jitter_strength!r}")
        self.image_size = image_size
        kernel = max(3, int(image_size / 10) // 2 * 2 + 1)
        self.pipeline = nn.Sequential(
            K.RandomResizedCrop((image_size, image_size), scale=(float(low), float(high))),
            K.RandomHorizontalFlip(p=float(flip)),
            K.ColorJitter(jitter_strength, jitter_strength, jitter_strength, jitter_strength / 4, p=float(jitter)),
            K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), p=float(blur)),
        )
        self.reseed(seed)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got {images.dtype}")
        call_seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        device = images.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if images.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(call_seed)  # only the RNGs forked here are seeded
            if images.is_cuda:
                with torch.cuda.device(devices[0]):
                    torch.cuda.manual_seed(call_seed)
            out = self.pipeline(images)
        return out.clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, seed={self.seed}"


class VectorAugment(_SeededModule):
    """Positive pairs for feature vectors: Gaussian noise and feature dropout.

    x' = m * (x + noise * eps) / (1 - drop), eps ~ N(0, I), m_k ~ Bernoulli(1 - drop), for
    standardised (B, d) features. Deterministic under ``seed`` with its own generator (the global
    RNG is untouched); ``get_state()`` / ``set_state()`` resume the same sequence.
    """

    def __init__(self, noise: float = 0.1, drop: float = 0.1, seed: int = 0):
        super().__init__()
        if noise < 0 or not 0 <= drop < 1:
            raise ValueError(f"need noise >= 0 and 0 <= drop < 1, got noise={noise}, drop={drop}")
        self.noise, self.drop = float(noise), float(drop)
        self.reseed(seed)

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.randn(x.shape, generator=self._generator).to(x.device, x.dtype)
        keep = (torch.rand(x.shape, generator=self._generator) >= self.drop).to(x.device, x.dtype)
        return keep * (x + self.noise * eps) / (1 - self.drop)


# The augmentation of each modality (data.augment.{modality}_options are its options); an image
# augmentation's size is the data's, passed by the trainer, never an option.
AUGMENTATIONS = Registry("augmentation", internal=("image_size",))
AUGMENTATIONS.register("image", ImageAugment)
AUGMENTATIONS.register("text", TextAugment)
AUGMENTATIONS.register("vector", VectorAugment)
