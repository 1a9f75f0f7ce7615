"""Fusion-model downstream tasks built from the emoji data: VQA, visual reasoning, visual entailment.

Three datasets, each generated from :class:`plait.data.emoji.EmojiDataset`'s split (train / test
split by base emoji, so no base emoji is in both) and deterministic under ``seed``:

- :class:`EmojiVQA`: an image and a question, the answer one of an answer vocabulary;
- :class:`EmojiReasoning` (NLVR2-like): two images and a statement, true or false;
- :class:`EmojiEntailment` (SNLI-VE-like): an image and a hypothesis (a person's gender or skin
  tone), entailment / neutral / contradiction.

Every answer follows from the emoji metadata (English name, Unicode group and subgroup, skin-tone
code points). Items are ``(index, image, text, label)``: ``image`` float32 (3, S, S) in [0, 1]
(reasoning: (2, 3, S, S), left then right), ``text`` a str, ``label`` an int (``label_names``;
``-1`` for a VQA test answer outside the training vocabulary, which counts as wrong).
:func:`collate_task` batches them (torch's default collate works too, with the texts as a tuple).

How the generators keep each modality alone near chance (the text-only and image-only baselines of
:mod:`plait.evaluate.task_baselines` measure it): a yes/no, true/false or entailment label is
never decided by the text or by the image(s) alone. Negatives are made by *moving* a text onto
another item's image (a matching, :func:`match`): every text appears as often with each label it
can take, and every image (pair) appears once with each label. See docs/tasks.md for the
definitions, examples and the measured baselines.

Validation carve: ``groups`` is the base emoji of each item's image (reasoning: the block of bases
both images come from), so :func:`plait.data.subset.carve_validation` keeps a base on one side;
:func:`carve_task_validation` wraps its two sides in :class:`TaskSubset`, whose items keep the label.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from plait.data.base import PairDataset, check_split
from plait.data.emoji import SKIN_TONES, EmojiDataset
from plait.data.subset import SubsetPairDataset, carve_validation

TONES = ("light", "medium-light", "medium", "medium-dark", "dark")  # U+1F3FB..U+1F3FF in order
# Things an emoji shows, asked about by name ("is there a heart in this emoji?"). Chosen so that the
# word in a name means the thing is drawn, and its absence mostly means it is not: words every
# person or face shows (face, hand, eyes, hair), words with another sense in names (hot dog, bell
# pepper, ice cream, police car light, fire extinguisher, computer mouse) and flag (country flags
# are not named "flag") are left out.
WORDS = (
    "heart", "arrow", "star", "moon", "sun", "cloud", "tree", "leaf", "cat", "monkey", "bear", "pig",
    "ball", "box", "book", "diamond", "circle", "square", "shoe", "camera", "umbrella", "clock", "house",
)
MALE = frozenset({"man", "men", "boy", "prince", "merman"})
FEMALE = frozenset({"woman", "women", "girl", "princess", "mermaid"})
UNSPECIFIED = frozenset({"person", "people", "child", "adult", "baby", "merperson"})
PEOPLE_GROUP = "people & body"


def name_tokens(caption: str) -> set[str]:
    """The words of a name, split at spaces and hyphens: 'smiling face with heart-eyes' -> {..., 'heart', 'eyes'}."""
    return {t for t in re.split(r"[\s\-]+", caption) if t}


def names_word(caption: str, word: str) -> bool:
    """Whether the name contains ``word`` or its plural (word + 's' / 'es') as a word."""
    tokens = name_tokens(caption)
    return bool(tokens & {word, word + "s", word + "es"})


def gender_of(caption: str, group: str) -> str | None:
    """'female', 'male', 'unspecified' (a person whose gender the name leaves open: person, people,
    child, adult, baby) or None (not a people & body emoji, no person word, or both genders named)."""
    if group != PEOPLE_GROUP:
        return None
    tokens = name_tokens(caption)
    male, female = bool(tokens & MALE), bool(tokens & FEMALE)
    if male != female:
        return "male" if male else "female"
    if not male and tokens & UNSPECIFIED:
        return "unspecified"
    return None


@dataclass
class _Meta:
    """Per-emoji metadata of one split, as arrays over the EmojiDataset's items (M,)."""

    group: np.ndarray  # int (M,)
    subgroup: np.ndarray  # int (M,)
    base: np.ndarray  # int (M,), key of the base emoji
    tone: np.ndarray  # int (M,): 0..4 single skin tone, -1 none, -2 several
    toneable: np.ndarray  # bool (M,): the base has skin-tone variants in the split
    gender: list  # str | None per emoji
    words: list  # tuple of WORDS the name contains, in WORDS order
    captions: list
    group_names: list
    subgroup_names: list

    @classmethod
    def of(cls, emoji: EmojiDataset) -> "_Meta":
        base = np.asarray(emoji.groups, dtype=np.int64)
        tones = []
        for cps in emoji.codepoints:
            found = sorted({c for c in cps if c in SKIN_TONES})
            tones.append(-1 if not found else (found[0] - 0x1F3FB if len(found) == 1 else -2))
        tone = np.array(tones, dtype=np.int64)
        toned_bases = set(base[tone != -1].tolist())
        toneable = np.array([b in toned_bases for b in base.tolist()])
        gnames, snames = emoji.class_names["group"], emoji.class_names["subgroup"]
        group, subgroup = emoji.labels["group"], emoji.labels["subgroup"]
        gender = [gender_of(c, gnames[g]) for c, g in zip(emoji.texts, group)]
        words = [tuple(w for w in WORDS if names_word(c, w)) for c in emoji.texts]
        return cls(group, subgroup, base, tone, toneable, gender, words, list(emoji.texts), gnames, snames)


def _balanced(rng: np.random.Generator, options, n: int) -> list:
    """``n`` picks from ``options``, each as often as possible (counts differ by at most one), shuffled."""
    options = list(options)
    order = rng.permutation(len(options))  # which options get the extra picks is random too
    picks = [options[order[k % len(options)]] for k in range(n)]
    return [picks[k] for k in rng.permutation(n)]


def _draw(rng: np.random.Generator, meta: _Meta, candidates: np.ndarray, n: int, by_group: bool = True) -> np.ndarray:
    """``n`` emoji from ``candidates``: a group (balanced over the groups present, when ``by_group``),
    then a base emoji uniformly within it, then one of the base's variants uniformly."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0:
        raise ValueError("no emoji of this split fits the item being generated")
    if by_group:
        keys = meta.group[candidates]
    else:
        keys = np.zeros(candidates.size, dtype=np.int64)
    present = np.unique(keys)
    tables = {}
    for g in present.tolist():
        members = candidates[keys == g]
        bases = meta.base[members]
        unique = np.unique(bases)
        tables[g] = (unique, {int(b): members[bases == b] for b in unique})
    chosen = _balanced(rng, present.tolist(), n) if n > 1 else [int(present[rng.integers(present.size)])]
    out = np.empty(n, dtype=np.int64)
    for k, g in enumerate(chosen):
        unique, variants = tables[g]
        b = int(unique[rng.integers(unique.size)])
        members = variants[b]
        out[k] = members[rng.integers(members.size)]
    return out


def match(rng: np.random.Generator, n: int, ok, tries: int = 200, rounds: int = 100) -> np.ndarray:
    """A permutation ``p`` of range(n) with ``ok(k, p[k])`` for every k: donor k's text goes to
    receiver p[k]. A seeded random permutation, then random swaps that fix both ends; a ValueError
    if none is found (the constraint cannot be met by this split's emoji)."""
    p = rng.permutation(n)
    for _ in range(rounds):
        bad = [k for k in range(n) if not ok(k, int(p[k]))]
        if not bad:
            return p
        for k in bad:
            if ok(k, int(p[k])):
                continue
            for _ in range(tries):
                j = int(rng.integers(n))
                if ok(k, int(p[j])) and ok(j, int(p[k])):
                    p[k], p[j] = p[j], p[k]
                    break
    raise ValueError(f"could not pair {n} texts with images that make them false / not decided; use more items or another seed")


def _positive(value, name: str) -> float:
    """``value`` as a float, refused (naming ``name``) unless it is a positive number."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class EmojiTask(PairDataset):
    """Base class of the emoji tasks. Item ``i`` is ``(i, image, text, label)``:

    - ``image``: float32 (3, S, S) in [0, 1] (reasoning: (2, 3, S, S), left then right image);
    - ``text``: the question / statement / hypothesis (``texts[i]``);
    - ``label``: int, an index into ``label_names`` (``targets[i]``; -1 for a VQA test answer
      outside the training vocabulary).

    Per-item attributes (length N): ``texts``, ``targets`` (int64), ``kinds`` (template name),
    ``answer_texts`` (the answer as a string), ``image_index`` (positions in ``emoji``, (N,) or
    (N, 2)), ``groups`` (int64 group key for a validation carve). Also ``labels = {"answer":
    targets}``, ``class_names = {"answer": label_names}``, ``num_classes`` and ``emoji`` (the
    :class:`EmojiDataset` of the split, whose uint8 images the items index).
    """

    modalities = ("image", "text")
    task = ""
    KINDS: tuple[str, ...] = ()

    def __init__(self, split: str, image_size: int, seed: int, test_fraction: float, split_seed: int, cache_dir):
        super().__init__()
        check_split(split)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.split, self.seed, self.split_seed = split, int(seed), int(split_seed)
        self.emoji = EmojiDataset(split, image_size=image_size, test_fraction=test_fraction, seed=split_seed, cache_dir=cache_dir)
        self.image_size = self.emoji.image_size
        self.meta = _Meta.of(self.emoji)
        self.label_names: list[str] = []
        self.kinds: list[str] = []
        self.answer_texts: list[str] = []

    def _finish(self, rows: list[tuple], rng: np.random.Generator) -> None:
        """Set the per-item attributes from rows (image_index, kind, text, answer), shuffled by ``rng``."""
        order = rng.permutation(len(rows))
        rows = [rows[k] for k in order]
        position = {name: k for k, name in enumerate(self.label_names)}
        self.image_index = np.array([r[0] for r in rows], dtype=np.int64)
        self.kinds = [r[1] for r in rows]
        self.texts = [r[2] for r in rows]
        self.answer_texts = [r[3] for r in rows]
        self.alternatives = [[] for _ in rows]
        self.targets = np.array([position.get(a, -1) for a in self.answer_texts], dtype=np.int64)
        self.labels = {"answer": self.targets}
        self.class_names = {"answer": list(self.label_names)}

    @property
    def answers(self) -> list[str]:
        """The label names (VQA: the answer vocabulary)."""
        return self.label_names

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def groups(self) -> np.ndarray:
        """(N,) the base emoji key of each item's image: one base stays on one side of a carve."""
        return self.meta.base[self.image_index]

    def __len__(self) -> int:
        return len(self.texts)

    def view_a(self, i: int) -> Tensor:
        """float32 (3, S, S) (reasoning: (2, 3, S, S)) in [0, 1]."""
        return self.emoji.images[torch.as_tensor(self.image_index[i])].float().div_(255.0)

    def view_b(self, i: int) -> str:
        return self.texts[i]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} is out of range for a dataset of {len(self)} items")
        return i, self.view_a(i), self.texts[i], int(self.targets[i])

    def balance(self) -> dict:
        """Label counts overall and per kind: {"all" | kind: {"n", "counts": {answer: n}, "majority": rate}}."""
        out = {}
        for kind in ["all", *self.KINDS]:
            answers = [a for a, k in zip(self.answer_texts, self.kinds) if kind in ("all", k)]
            if not answers:
                continue
            counts = Counter(answers)
            out[kind] = {"n": len(answers), "counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
                         "majority": max(counts.values()) / len(answers)}
        return out

    def caption_of(self, i: int) -> str:
        return " | ".join(self.meta.captions[j] for j in np.atleast_1d(self.image_index[i]))

    def example(self, i: int) -> str:
        """One line for docs: ``#i [emoji name(s)] text -> answer``."""
        return f"#{i} [{self.caption_of(i)}] {self.texts[i]} -> {self.answer_texts[i]}"

    def describe(self) -> dict:
        summary = super().describe()
        summary.update(task=self.task, split=self.split, seed=self.seed, num_classes=self.num_classes,
                       majority={k: round(v["majority"], 4) for k, v in self.balance().items()})
        return summary

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, size={len(self)}, image_size={self.image_size}, seed={self.seed})"


class EmojiVQA(EmojiTask):
    """Visual question answering on emoji: an image (3, S, S) and a question; the answer is a class
    of the answer vocabulary ``answers``: "yes", "no", then every group and subgroup name that an
    emoji of the *training* split has (the same list in every split; a test answer outside it has
    label -1 and counts as wrong, see ``out_of_vocabulary``).

    Question kinds (``kinds``), each ``1/5`` of the items, two phrasings each:

    - ``group``: "what group is this emoji in?" -> the group name;
    - ``subgroup``: "what subgroup is this emoji in?" -> the subgroup name;
    - ``group_yn``: "is this emoji in the group G?" -> yes / no;
    - ``subgroup_yn``: "is this emoji in the subgroup S?" -> yes / no;
    - ``word_yn``: "is there a W in this emoji?" -> yes iff the name contains W (or W+s, W+es) as a
      word, W from :data:`WORDS` (decided by the name: a "no" means the name does not mention it).

    Images are drawn group-balanced (a group uniformly, then a base emoji, then a variant), so the
    open kinds' answers are spread (group answers uniform). The yes/no kinds are exactly balanced:
    ``k`` images get a true question about themselves (yes), and the same ``k`` questions are moved
    onto the same images permuted so that each becomes false (no): every question text and every
    image has as many yes as no.

    ``per_image``: items = about ``per_image`` x the number of emoji in the split (each kind gets
    ``2 * round(per_image * M / 10)``).
    """

    task = "vqa"
    KINDS = ("group", "subgroup", "group_yn", "subgroup_yn", "word_yn")
    PHRASES = {
        "group": ("what group is this emoji in?", "which group does this emoji belong to?"),
        "subgroup": ("what subgroup is this emoji in?", "which subgroup does this emoji belong to?"),
        "group_yn": ("is this emoji in the group {}?", "does this emoji belong to the group {}?"),
        "subgroup_yn": ("is this emoji in the subgroup {}?", "does this emoji belong to the subgroup {}?"),
        "word_yn": ("is there a {} in this emoji?", "does this emoji show a {}?"),
    }

    def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0, per_image: float = 2.0,
                 test_fraction: float = 0.2, split_seed: int = 0, cache_dir=None):
        super().__init__(split, image_size, seed, test_fraction, split_seed, cache_dir)
        self.per_image = _positive(per_image, "per_image")
        train = self.emoji if split == "train" else EmojiDataset("train", image_size=image_size, test_fraction=test_fraction,
                                                                 seed=split_seed, cache_dir=cache_dir)
        names = train.class_names
        vocabulary = ["yes", "no"]
        vocabulary += [names["group"][g] for g in sorted(set(train.labels["group"].tolist()))]
        vocabulary += [names["subgroup"][s] for s in sorted(set(train.labels["subgroup"].tolist()))]
        self.label_names = list(dict.fromkeys(vocabulary))

        rng = np.random.default_rng(self.seed)
        meta, n = self.meta, len(self.emoji)
        per_kind = 2 * max(1, int(round(self.per_image * n / (2 * len(self.KINDS)))))
        everyone = np.arange(n)

        def gname(j):
            """The group name of emoji j."""
            return meta.group_names[meta.group[j]]

        def sname(j):
            """The subgroup name of emoji j."""
            return meta.subgroup_names[meta.subgroup[j]]

        def shows(word, j):
            """Whether emoji j's name contains ``word`` (one of :data:`WORDS`)."""
            return word in meta.words[j]

        rows = []
        for kind, answer in (("group", gname), ("subgroup", sname)):
            for j in _draw(rng, meta, everyone, per_kind).tolist():
                rows.append((j, kind, self.PHRASES[kind][rng.integers(2)], answer(j)))
        with_words = np.array([j for j in range(n) if meta.words[j]], dtype=np.int64)
        subjects = {
            "group_yn": (everyone, lambda j: gname(j)),
            "subgroup_yn": (everyone, lambda j: sname(j)),
            "word_yn": (with_words, None),
        }
        for kind, (candidates, subject) in subjects.items():
            images = _draw(rng, meta, candidates, per_kind // 2).tolist()
            if kind == "word_yn":
                topics = [meta.words[j][rng.integers(len(meta.words[j]))] for j in images]
                holds = shows
            else:
                topics = [subject(j) for j in images]
                holds = (lambda t, j: gname(j) == t) if kind == "group_yn" else (lambda t, j: sname(j) == t)
            texts = [self.PHRASES[kind][rng.integers(2)].format(t) for t in topics]
            p = match(rng, len(images), lambda k, m: not holds(topics[k], images[m]))
            for k, j in enumerate(images):
                rows.append((j, kind, texts[k], "yes"))
                rows.append((images[int(p[k])], kind, texts[k], "no"))
        self._finish(rows, rng)

    @property
    def out_of_vocabulary(self) -> np.ndarray:
        """(N,) bool: the answer is not in the training vocabulary (label -1: always wrong)."""
        return self.targets < 0


class EmojiReasoning(EmojiTask):
    """Visual reasoning on emoji pairs (NLVR2-like): two images, item image (2, 3, S, S) = (left,
    right), and a statement; label 1 ("true") or 0 ("false").

    Statement kinds (``kinds``), each 1/6 of the image pairs:

    - ``both_group``: "both images are in the group G."
    - ``left_subgroup``: "the left image is in the subgroup S and the right one is not."
    - ``right_group``: "the right image is in the group G and the left one is not."
    - ``same_subgroup``: "the two images are in the same subgroup."
    - ``different_groups``: "the two images are in different groups."
    - ``exactly_one_word``: "exactly one image shows a W." (W from :data:`WORDS`, by name as in VQA)

    ``pairs`` image pairs are drawn, each with a statement true of it; the same statements are then
    moved onto the same pairs permuted so that each becomes false. So every pair is once true and
    once false, every statement text as often true as false, per kind and overall: 2 x ``pairs``
    items (``pairs`` rounded to a multiple of 6; default: the number of emoji in the split).

    Both images of a pair are different base emoji from one *block* (the split's bases are dealt
    into blocks of about ``block_size`` by ``seed``); ``groups`` is the block, so a validation carve
    by ``groups`` keeps every base on one side. ``image_index`` is (N, 2).
    """

    task = "reasoning"
    modalities = ("image_pair", "text")
    KINDS = ("both_group", "left_subgroup", "right_group", "same_subgroup", "different_groups", "exactly_one_word")
    PHRASES = {
        "both_group": "both images are in the group {}.",
        "left_subgroup": "the left image is in the subgroup {} and the right one is not.",
        "right_group": "the right image is in the group {} and the left one is not.",
        "same_subgroup": "the two images are in the same subgroup.",
        "different_groups": "the two images are in different groups.",
        "exactly_one_word": "exactly one image shows a {}.",
    }

    def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0, pairs: int | None = None,
                 block_size: int = 50, test_fraction: float = 0.2, split_seed: int = 0, cache_dir=None):
        super().__init__(split, image_size, seed, test_fraction, split_seed, cache_dir)
        meta, n = self.meta, len(self.emoji)
        pairs = n if pairs is None else pairs
        if isinstance(pairs, bool) or not isinstance(pairs, (int, np.integer)) or pairs < len(self.KINDS):
            raise ValueError(f"pairs must be an integer >= {len(self.KINDS)}, got {pairs!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
        self.label_names = ["false", "true"]
        self.block_size = int(block_size)
        rng = np.random.default_rng(self.seed)
        bases = np.unique(meta.base)
        n_blocks = max(1, int(round(bases.size / self.block_size)))
        block_of_base = np.empty(int(bases.max()) + 1, dtype=np.int64)
        for b, chunk in enumerate(np.array_split(rng.permutation(bases), n_blocks)):
            block_of_base[chunk] = b
        self.block = block_of_base[meta.base]  # (M,) block of each emoji
        self.n_blocks = n_blocks

        per_kind = int(pairs) // len(self.KINDS)
        g, s = meta.group, meta.subgroup

        def gname(j):
            """The group name of emoji j."""
            return meta.group_names[g[j]]

        def sname(j):
            """The subgroup name of emoji j."""
            return meta.subgroup_names[s[j]]

        with_words = np.array([j for j in range(n) if meta.words[j]], dtype=np.int64)
        everyone = np.arange(n)
        without = {w: np.array([w not in ws for ws in meta.words]) for w in WORDS}

        def mates(j, condition):
            """Emoji of j's block, another base, meeting ``condition`` (bool (M,))."""
            return np.flatnonzero((self.block == self.block[j]) & (meta.base != meta.base[j]) & condition)

        queue: dict[str, list[int]] = {}

        def next_first(kind):
            """The next first image for ``kind``: drawn group-balanced, in batches."""
            if not queue.get(kind):
                pool = with_words if kind == "exactly_one_word" else everyone
                queue[kind] = _draw(rng, meta, pool, 2 * per_kind).tolist()[::-1]
            return queue[kind].pop()

        def true_pair(kind):
            for _ in range(10_000):
                first = next_first(kind)
                if kind == "both_group":
                    cand, subject = mates(first, g == g[first]), gname(first)
                elif kind in ("left_subgroup", "right_group"):
                    cond = (s != s[first]) if kind == "left_subgroup" else (g != g[first])
                    cand, subject = mates(first, cond), sname(first) if kind == "left_subgroup" else gname(first)
                elif kind == "same_subgroup":
                    cand, subject = mates(first, s == s[first]), None
                elif kind == "different_groups":
                    cand, subject = mates(first, g != g[first]), None
                else:
                    subject = meta.words[first][rng.integers(len(meta.words[first]))]
                    cand = mates(first, without[subject])
                if cand.size:
                    break
            else:
                raise ValueError(f"no pair of this split's emoji makes a {kind!r} statement true; use a larger block_size")
            second = int(_draw(rng, meta, cand, 1)[0])
            if kind == "right_group" or (kind == "exactly_one_word" and rng.integers(2)):
                return (second, first), subject
            return (first, second), subject

        def holds(kind, subject, pair):
            left, right = pair
            if kind == "both_group":
                return gname(left) == subject and gname(right) == subject
            if kind == "left_subgroup":
                return sname(left) == subject and sname(right) != subject
            if kind == "right_group":
                return gname(right) == subject and gname(left) != subject
            if kind == "same_subgroup":
                return bool(s[left] == s[right])
            if kind == "different_groups":
                return bool(g[left] != g[right])
            return (subject in meta.words[left]) != (subject in meta.words[right])

        statements = []  # (kind, subject, text)
        drawn = []
        for kind in self.KINDS:
            for _ in range(per_kind):
                pair, subject = true_pair(kind)
                text = self.PHRASES[kind].format(subject) if subject is not None else self.PHRASES[kind]
                statements.append((kind, subject, text))
                drawn.append(pair)
        p = match(rng, len(drawn), lambda k, m: not holds(statements[k][0], statements[k][1], drawn[m]))
        rows = []
        for k, (kind, _, text) in enumerate(statements):
            rows.append((drawn[k], kind, text, "true"))
            rows.append((drawn[int(p[k])], kind, text, "false"))
        self._finish(rows, rng)
        self.image_index = self.image_index.reshape(-1, 2)

    @property
    def groups(self) -> np.ndarray:
        """(N,) the block of each item's two images: a carve by it keeps every base on one side."""
        return self.block[self.image_index[:, 0]]


class EmojiEntailment(EmojiTask):
    """Visual entailment on emoji (SNLI-VE-like): an image (3, S, S) and a hypothesis; label 0
    "entailment", 1 "neutral" or 2 "contradiction".

    Definition, from the emoji's metadata (group, name, skin-tone code points):

    - **entailment**: the hypothesis is true of the emoji;
    - **contradiction**: it is false of the emoji;
    - **neutral**: neither the image nor its metadata decides it. Two sources, each with the *same*
      hypothesis wording that other images make true or false: (a) the gender of a person whose
      name leaves it open (person, people, child, adult, baby, merperson: "this emoji shows a
      woman." about "person cook medium skin tone"); (b) the skin tone of an emoji that has
      skin-tone variants but is the default one, without a modifier (Unicode's generic,
      non-realistic yellow: "this emoji shows dark skin." about "woman cook").

    Hypothesis kinds (``kinds``): ``gender`` (:data:`GENDER` phrasings x woman / man) and ``tone``
    (:data:`TONE` phrasings x the five tones). Every exact hypothesis text has each of the three
    labels equally often, so the text alone says nothing about the label.

    Images: people & body emoji of two types, drawn in equal numbers (a base uniformly, then one of
    its variants): *gendered default* (a woman or man word, no skin-tone modifier; half women, half
    men) and *gender-open toned* (a person word, one skin-tone modifier; the five tones equally
    often). Each drawn image gets exactly three items, one per label (so the image alone says
    nothing either): a gendered default image takes its own gender (entailment), the other gender
    in the same phrasing (contradiction) and a tone hypothesis (neutral); a gender-open toned image
    takes its own tone (entailment), another image's tone text of a different tone (contradiction)
    and a gender hypothesis (neutral). The neutral texts are the entailment texts of the other type,
    permuted, which makes every text exactly one third each label.

    ``per_image``: items = about ``per_image`` x the number of emoji in the split (a multiple of 60).
    """

    task = "entailment"
    KINDS = ("gender", "tone")
    LABELS = ("entailment", "neutral", "contradiction")
    GENDER = ("this emoji shows a {}.", "a {} is shown in this emoji.")
    TONE = ("this emoji shows {} skin.", "the skin tone in this emoji is {}.")
    WORD = {"female": "woman", "male": "man"}

    def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0, per_image: float = 2.0,
                 test_fraction: float = 0.2, split_seed: int = 0, cache_dir=None):
        super().__init__(split, image_size, seed, test_fraction, split_seed, cache_dir)
        self.per_image = _positive(per_image, "per_image")
        self.label_names = list(self.LABELS)
        E, N, C = self.LABELS
        rng = np.random.default_rng(self.seed)
        meta, m = self.meta, len(self.emoji)
        unit = 2 * max(1, int(round(self.per_image * m / 60)))  # 30 items per unit
        n = 5 * unit  # images of each type: even (women = men), a multiple of 5 (one fifth per tone)
        gender = np.array([x or "" for x in meta.gender])
        default = meta.toneable & (meta.tone == -1)
        toned = (gender == "unspecified") & (meta.tone >= 0)

        def draw(mask, values, options):
            """len(options)-balanced picks of ``values``; for each, an emoji of ``mask`` with it (base, then variant)."""
            return [int(_draw(rng, meta, np.flatnonzero(mask & (values == v)), 1, by_group=False)[0])
                    for v in _balanced(rng, options, n)]

        gd = draw(default, gender, ["female", "male"])  # gendered, default (yellow) tone
        nt = draw(toned, meta.tone, list(range(5)))  # gender-open, one skin tone
        # phrasings: the same sequence for women and men, so each phrasing has as many of both
        sequence = _balanced(rng, range(len(self.GENDER)), n // 2)
        position = {"female": 0, "male": 0}
        rows = []
        gender_texts = []  # the entailment gender texts, given again (permuted) to the neutral images
        for j in gd:
            g = gender[j]
            phrase = self.GENDER[sequence[position[g]]]
            position[g] += 1
            own, other = phrase.format(self.WORD[g]), phrase.format(self.WORD["male" if g == "female" else "female"])
            rows += [(j, "gender", own, E), (j, "gender", other, C)]
            gender_texts.append(own)
        phrasing = _balanced(rng, range(len(self.TONE)), n)
        tone_texts = [self.TONE[q].format(TONES[meta.tone[j]]) for j, q in zip(nt, phrasing)]
        p = match(rng, n, lambda k, r: meta.tone[nt[r]] != meta.tone[nt[k]])
        for k, j in enumerate(nt):
            rows += [(j, "tone", tone_texts[k], E), (nt[int(p[k])], "tone", tone_texts[k], C)]
        for j, k in zip(nt, rng.permutation(n)):
            rows.append((j, "gender", gender_texts[int(k)], N))
        for j, k in zip(gd, rng.permutation(n)):
            rows.append((j, "tone", tone_texts[int(k)], N))
        self._finish(rows, rng)


TASKS: dict[str, type[EmojiTask]] = {"vqa": EmojiVQA, "reasoning": EmojiReasoning, "entailment": EmojiEntailment}


def build_task(name: str, split: str = "train", **options) -> EmojiTask:
    """``build_task("vqa", "test", image_size=16)`` -> EmojiVQA; names: vqa, reasoning, entailment."""
    key = str(name).lower()
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}")
    return TASKS[key](split=split, **options)


def collate_task(batch: list[tuple]) -> tuple[Tensor, Tensor, list[str], Tensor]:
    """Batch task items into ``(index (B,) int64, images (B, 3, S, S) or (B, 2, 3, S, S) float32,
    texts list[str], labels (B,) int64)``."""
    index = torch.tensor([int(item[0]) for item in batch], dtype=torch.long)
    images = torch.stack([item[1] for item in batch])
    texts = [item[2] for item in batch]
    labels = torch.tensor([int(item[3]) for item in batch], dtype=torch.long)
    return index, images, texts, labels


class TaskSubset(SubsetPairDataset):
    """A subset of a task dataset whose items keep the task format ``(i, image, text, label)``
    (a plain :class:`SubsetPairDataset` gives ``(i, image, text)``); per-item task attributes
    (``targets``, ``kinds``, ``answer_texts``, ``image_index``) are sliced too."""

    def __init__(self, base: EmojiTask, indices, name: str = "subset"):
        super().__init__(base, indices, name)
        self.targets = np.asarray(base.targets)[self.indices]
        self.kinds = [base.kinds[i] for i in self.indices]
        self.answer_texts = [base.answer_texts[i] for i in self.indices]
        self.image_index = np.asarray(base.image_index)[self.indices]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} is out of range for a dataset of {len(self)} items")
        _, image, text, label = self.base[int(self.indices[i])]
        return i, image, text, label


def carve_task_validation(dataset: EmojiTask, fraction: float, seed: int) -> tuple[TaskSubset, TaskSubset]:
    """:func:`plait.data.subset.carve_validation` (by ``dataset.groups``: base emoji, or blocks of
    them for reasoning) with both sides as :class:`TaskSubset`."""
    fit, validation = carve_validation(dataset, fraction, seed)
    return TaskSubset(dataset, fit.indices, "fit"), TaskSubset(dataset, validation.indices, "validation")
