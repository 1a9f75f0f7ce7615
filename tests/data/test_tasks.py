"""The emoji fusion tasks: splits, determinism, sizes, balance, and every label recomputed from the
emoji metadata here (names, groups, skin-tone code points) without the generator's own functions."""

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from plait.data import EmojiDataset
from plait.data.subset import carve_validation
from plait.data.tasks import (
    EmojiEntailment,
    EmojiReasoning,
    EmojiVQA,
    TaskSubset,
    build_task,
    carve_task_validation,
    collate_task,
)

SIZE = 8
DOCS = Path(__file__).resolve().parents[2] / "docs" / "tasks.md"
TONE_NAMES = {0x1F3FB: "light", 0x1F3FC: "medium-light", 0x1F3FD: "medium", 0x1F3FE: "medium-dark", 0x1F3FF: "dark"}


@pytest.fixture(scope="module")
def emoji(_plait_cache):
    return {s: EmojiDataset(s, image_size=SIZE, cache_dir=_plait_cache) for s in ("train", "test")}


@pytest.fixture(scope="module")
def tasks(_plait_cache):
    built = {}
    for cls in (EmojiVQA, EmojiReasoning, EmojiEntailment):
        for split in ("train", "test"):
            built[cls.task, split] = cls(split, image_size=SIZE, seed=0, cache_dir=_plait_cache)
    return built


class Facts:
    """What the test knows about each emoji of a split, from EmojiDataset's public attributes."""

    def __init__(self, ds: EmojiDataset):
        self.ds = ds
        self.position = {e: k for k, e in enumerate(ds.emojis)}
        self.group = [ds.class_names["group"][g] for g in ds.labels["group"]]
        self.subgroup = [ds.class_names["subgroup"][s] for s in ds.labels["subgroup"]]
        self.tones = [{TONE_NAMES[ord(ch)] for ch in e if ord(ch) in TONE_NAMES} for e in ds.emojis]
        plain = ["".join(ch for ch in e if ord(ch) not in TONE_NAMES) for e in ds.emojis]
        toned_bases = {p for p, t in zip(plain, self.tones) if t}
        self.toneable = [p in toned_bases for p in plain]
        self.base = plain

    def words(self, k):
        return re.split(r"[ \-]+", self.ds.texts[k])

    def names(self, k, word):
        return any(w in (word, word + "s", word + "es") for w in self.words(k))

    def gender(self, k):
        if self.group[k] != "people & body":
            return None
        w = set(self.words(k))
        male, female = bool(w & {"man", "men", "boy", "prince", "merman"}), bool(w & {"woman", "women", "girl", "princess",
                                                                                      "mermaid"})
        if male and not female:
            return "male"
        if female and not male:
            return "female"
        if not male and w & {"person", "people", "child", "adult", "baby", "merperson"}:
            return "unspecified"
        return None


def facts_of(task, emoji):
    facts = Facts(emoji[task.split])
    # the task's images are the split's emoji: map the task's positions to the independent dataset
    where = np.array([facts.position[e] for e in task.emoji.emojis])
    return facts, where


def vqa_answer(f: Facts, k: int, question: str) -> str:
    if question in ("what group is this emoji in?", "which group does this emoji belong to?"):
        return f.group[k]
    if question in ("what subgroup is this emoji in?", "which subgroup does this emoji belong to?"):
        return f.subgroup[k]
    m = re.fullmatch(r"(?:is this emoji in|does this emoji belong to) the (group|subgroup) (.+)\?", question)
    if m:
        actual = f.group[k] if m.group(1) == "group" else f.subgroup[k]
        return "yes" if actual == m.group(2) else "no"
    m = re.fullmatch(r"(?:is there a (\w+) in this emoji|does this emoji show a (\w+))\?", question)
    assert m, question
    return "yes" if f.names(k, m.group(1) or m.group(2)) else "no"


def reasoning_truth(f: Facts, left: int, right: int, statement: str) -> bool:
    if m := re.fullmatch(r"both images are in the group (.+)\.", statement):
        return f.group[left] == m.group(1) == f.group[right]
    if m := re.fullmatch(r"the left image is in the subgroup (.+) and the right one is not\.", statement):
        return f.subgroup[left] == m.group(1) != f.subgroup[right]
    if m := re.fullmatch(r"the right image is in the group (.+) and the left one is not\.", statement):
        return f.group[right] == m.group(1) != f.group[left]
    if statement == "the two images are in the same subgroup.":
        return f.subgroup[left] == f.subgroup[right]
    if statement == "the two images are in different groups.":
        return f.group[left] != f.group[right]
    m = re.fullmatch(r"exactly one image shows a (\w+)\.", statement)
    assert m, statement
    return f.names(left, m.group(1)) != f.names(right, m.group(1))


def entailment_label(f: Facts, k: int, hypothesis: str) -> str:
    """True / False / undecided by the metadata -> entailment / contradiction / neutral."""
    def value(v):
        return {True: "entailment", False: "contradiction", None: "neutral"}[v]

    if m := re.fullmatch(r"this emoji shows a (woman|man)\.|a (woman|man) is shown in this emoji\.", hypothesis):
        g = f.gender(k)
        assert g is not None, f"gender hypothesis on {f.ds.texts[k]!r}"
        return value(None if g == "unspecified" else (g == "female") == ((m.group(1) or m.group(2)) == "woman"))
    tones = "light|medium-light|medium|medium-dark|dark"
    m = re.fullmatch(rf"this emoji shows ({tones}) skin\.|the skin tone in this emoji is ({tones})\.", hypothesis)
    assert m, hypothesis
    assert f.toneable[k] and len(f.tones[k]) <= 1
    return value(None if not f.tones[k] else (m.group(1) or m.group(2)) in f.tones[k])


def check_images(task, f, where, items=200):
    """The item's image tensor is the (independently loaded) emoji's image, for a sample of items."""
    for i in np.linspace(0, len(task) - 1, items).astype(int):
        index, image, text, label = task[i]
        assert index == i and text == task.texts[i] and label == task.targets[i]
        positions = np.atleast_1d(where[task.image_index[i]])
        expected = torch.stack([f.ds.images[p].float() / 255 for p in positions]).squeeze(0)
        assert image.dtype == torch.float32 and torch.equal(image, expected)


@pytest.mark.parametrize("split", ["train", "test"])
def test_vqa_answers_from_metadata(tasks, emoji, split):
    task = tasks["vqa", split]
    f, where = facts_of(task, emoji)
    check_images(task, f, where)
    vocabulary = tasks["vqa", "train"].label_names
    assert task.label_names == vocabulary and task.answers == vocabulary and task.num_classes == len(vocabulary)
    train = Facts(emoji["train"])
    assert vocabulary == ["yes", "no", *dict.fromkeys(g for g in emoji["train"].class_names["group"] if g in train.group),
                          *dict.fromkeys(s for s in emoji["train"].class_names["subgroup"] if s in train.subgroup)]
    for i in range(len(task)):
        answer = vqa_answer(f, where[task.image_index[i]], task.texts[i])
        assert task.answer_texts[i] == answer
        assert task.targets[i] == (vocabulary.index(answer) if answer in vocabulary else -1)
    oov = [a for a in task.answer_texts if a not in vocabulary]
    assert (split == "train") == (not oov) and task.out_of_vocabulary.sum() == len(oov)


@pytest.mark.parametrize("split", ["train", "test"])
def test_reasoning_truth_from_metadata(tasks, emoji, split):
    task = tasks["reasoning", split]
    f, where = facts_of(task, emoji)
    check_images(task, f, where)
    assert task.image_index.shape == (len(task), 2) and task.label_names == ["false", "true"]
    for i in range(len(task)):
        left, right = where[task.image_index[i]]
        assert f.base[left] != f.base[right], "two different base emoji"
        assert task.targets[i] == int(reasoning_truth(f, left, right, task.texts[i]))


@pytest.mark.parametrize("split", ["train", "test"])
def test_entailment_labels_from_metadata(tasks, emoji, split):
    task = tasks["entailment", split]
    f, where = facts_of(task, emoji)
    check_images(task, f, where)
    assert task.label_names == ["entailment", "neutral", "contradiction"]
    for i in range(len(task)):
        assert task.answer_texts[i] == entailment_label(f, where[task.image_index[i]], task.texts[i])
        assert task.label_names[task.targets[i]] == task.answer_texts[i]


def test_splits_by_base_and_sizes(tasks, emoji):
    train_bases, test_bases = set(Facts(emoji["train"]).base), set(Facts(emoji["test"]).base)
    sizes = {("vqa", "train"): 6230, ("vqa", "test"): 1660, ("reasoning", "train"): 6228, ("reasoning", "test"): 1656,
             ("entailment", "train"): 6240, ("entailment", "test"): 1680}
    for (name, split), task in tasks.items():
        assert len(task) == sizes[name, split] == len(task.texts) == len(task.kinds) == task.targets.shape[0]
        f, where = facts_of(task, emoji)
        used = {f.base[k] for k in where[task.image_index].ravel()}
        assert used <= (train_bases if split == "train" else test_bases)
        assert task.emoji.split == split
    assert not train_bases & test_bases


def test_deterministic_under_seed(tasks, _plait_cache):
    for cls in (EmojiVQA, EmojiReasoning, EmojiEntailment):
        first = tasks[cls.task, "test"]
        again = cls("test", image_size=16, seed=0, cache_dir=_plait_cache)
        other = cls("test", image_size=SIZE, seed=1, cache_dir=_plait_cache)
        assert again.texts == first.texts and np.array_equal(again.targets, first.targets)
        assert np.array_equal(again.image_index, first.image_index), "items do not depend on image_size"
        assert again[0][1].shape[-3:] == (3, 16, 16)
        assert other.texts != first.texts and len(other) == len(first)


def test_vqa_balance(tasks):
    for split in ("train", "test"):
        task = tasks["vqa", split]
        kinds = Counter(task.kinds)
        assert set(kinds.values()) == {len(task) // 5}
        by_text, by_image = defaultdict(Counter), defaultdict(Counter)
        for text, kind, j, answer in zip(task.texts, task.kinds, task.image_index, task.answer_texts):
            if kind.endswith("_yn"):
                by_text[text][answer] += 1
                by_image[kind, int(j)][answer] += 1
        assert all(c["yes"] == c["no"] for c in by_text.values()), "every yes/no question text as often yes as no"
        assert all(c["yes"] == c["no"] for c in by_image.values()), "every image as often yes as no, per kind"
        for kind in ("group", "subgroup"):
            answers = Counter(a for a, k in zip(task.answer_texts, task.kinds) if k == kind)
            assert max(answers.values()) / sum(answers.values()) < 0.12
        group_answers = Counter(a for a, k in zip(task.answer_texts, task.kinds) if k == "group")
        assert max(group_answers.values()) - min(group_answers.values()) <= 1 and len(group_answers) == 9
        assert task.balance()["all"]["majority"] == pytest.approx(0.3)


def test_reasoning_balance(tasks):
    for split in ("train", "test"):
        task = tasks["reasoning", split]
        assert Counter(task.targets.tolist()) == {0: len(task) // 2, 1: len(task) // 2}
        per = defaultdict(Counter)
        for text, kind, pair, label in zip(task.texts, task.kinds, task.image_index, task.targets):
            per["kind", kind][label] += 1
            per["text", text][label] += 1
            per["pair", tuple(pair)][label] += 1
        assert all(c[0] == c[1] for c in per.values()), "every kind, statement and pair as often true as false"
        assert len({k for k in per if k[0] == "kind"}) == 6


def test_entailment_balance(tasks, emoji):
    for split in ("train", "test"):
        task = tasks["entailment", split]
        f, where = facts_of(task, emoji)
        assert Counter(task.answer_texts) == {name: len(task) // 3 for name in task.label_names}
        assert Counter(task.kinds) == {"gender": len(task) // 2, "tone": len(task) // 2}
        per_kind, per_text, per_image, types = defaultdict(Counter), defaultdict(Counter), defaultdict(Counter), Counter()
        for text, kind, j, answer in zip(task.texts, task.kinds, task.image_index, task.answer_texts):
            per_kind[kind][answer] += 1
            per_text[text][answer] += 1
            per_image[int(j)][answer] += 1
            k = where[j]
            types[f.gender(k) == "unspecified", bool(f.tones[k])] += 1
        for counts in (*per_kind.values(), *per_text.values()):
            assert len(counts) == 3 and len(set(counts.values())) == 1, "every kind and text one third each label"
        assert len(per_text) == 2 * 2 + 2 * 5, "two phrasings of each gender and each tone"
        assert all(len(c) == 3 and len(set(c.values())) == 1 for c in per_image.values()), \
            "every image once per label (or a multiple)"
        # images: gendered default-tone and gender-open toned, in equal numbers
        assert types == {(False, False): len(task) // 2, (True, True): len(task) // 2}


def test_validation_carve_keeps_bases_apart(tasks, emoji):
    for name in ("vqa", "reasoning", "entailment"):
        task = tasks[name, "train"]
        f, where = facts_of(task, emoji)
        fit, validation = carve_validation(task, 0.1, seed=0)
        bases = [{f.base[k] for k in where[task.image_index[side.indices]].ravel()} for side in (fit, validation)]
        assert not bases[0] & bases[1] and len(fit) + len(validation) == len(task)
        assert 0.03 < len(validation) / len(task) < 0.2
        fit2, validation2 = carve_task_validation(task, 0.1, seed=0)
        assert isinstance(validation2, TaskSubset) and np.array_equal(validation2.indices, validation.indices)
        i = len(validation2) - 1
        index, image, text, label = validation2[i]
        j = int(validation.indices[i])
        assert index == i and text == task.texts[j] and label == task.targets[j] and torch.equal(image, task[j][1])
        assert validation2.kinds[i] == task.kinds[j] and validation2.num_classes == task.num_classes


def test_collate_and_loader(tasks):
    for name, shape in (("vqa", (4, 3, SIZE, SIZE)), ("reasoning", (4, 2, 3, SIZE, SIZE)), ("entailment", (4, 3, SIZE, SIZE))):
        task = tasks[name, "test"]
        index, images, texts, labels = next(iter(DataLoader(task, batch_size=4, collate_fn=collate_task)))
        assert index.tolist() == [0, 1, 2, 3] and images.shape == shape and images.dtype == torch.float32
        assert texts == task.texts[:4] and labels.tolist() == task.targets[:4].tolist()
        default = next(iter(DataLoader(task, batch_size=4)))
        assert torch.equal(default[1], images) and list(default[2]) == texts and torch.equal(default[3], labels)
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_options_checked(_plait_cache):
    assert isinstance(build_task("vqa", "test", image_size=SIZE, per_image=0.5, cache_dir=_plait_cache), EmojiVQA)
    assert len(build_task("reasoning", "test", image_size=SIZE, pairs=60, cache_dir=_plait_cache)) == 120
    with pytest.raises(ValueError, match="unknown task"):
        build_task("nlvr")
    with pytest.raises(ValueError, match="per_image"):
        EmojiVQA("test", image_size=SIZE, per_image=0, cache_dir=_plait_cache)
    with pytest.raises(ValueError, match="pairs"):
        EmojiReasoning("test", image_size=SIZE, pairs=3, cache_dir=_plait_cache)
    with pytest.raises(ValueError, match="split"):
        EmojiEntailment("validation")


def documented_examples():
    """(class, split, seed, [(index, line)]) for each example block of docs/tasks.md."""
    blocks, current = [], None
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"(EmojiVQA|EmojiReasoning|EmojiEntailment)\(split=\"(\w+)\", seed=(\d+)\)", line.strip()):
            current = ({"EmojiVQA": EmojiVQA, "EmojiReasoning": EmojiReasoning, "EmojiEntailment": EmojiEntailment}[m.group(1)],
                       m.group(2), int(m.group(3)), [])
            blocks.append(current)
        elif current is not None and (m := re.match(r"#(\d+) ", line)):
            current[3].append((int(m.group(1)), line.rstrip()))
        elif line.startswith("```"):
            current = None
    return blocks


def test_documented_examples_are_generated(tasks, _plait_cache):
    blocks = documented_examples()
    assert len(blocks) >= 4 and sum(len(b[3]) for b in blocks) >= 20
    for cls, split, seed, lines in blocks:
        task = tasks.get((cls.task, split)) if seed == 0 else None
        task = task or cls(split, image_size=SIZE, seed=seed, cache_dir=_plait_cache)
        for index, line in lines:
            assert task.example(index) == line
