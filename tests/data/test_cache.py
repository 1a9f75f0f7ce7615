import os

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from plait.data import CsvPairDataset, EmojiDataset, ImageCache, clear_memory_cache, decode_image, default_cache_dir


def make_images(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        path = folder / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (24, 16, 4), dtype=np.uint8), "RGBA").save(path)
        paths.append(path)
    return paths


def forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("PIL.Image.open called: the cache was not used")

    monkeypatch.setattr(PIL.Image, "open", fail)


def test_decode_composites_on_white_resizes_and_crops(tmp_path):
    pixels = np.zeros((4, 8, 4), dtype=np.uint8)
    pixels[:, :, 0] = 255
    pixels[:, :, 3] = 0
    pixels[:, 2:6, 3] = 255  # opaque red in the middle half, transparent at the sides
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", 4)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 0], 255)
    np.testing.assert_array_equal(out[:, :, 1:], 0)  # the centre crop is the opaque red part
    np.testing.assert_array_equal(decode_image(tmp_path / "a.png", 2)[..., 0], 255)


def test_disk_cache_is_used_by_a_new_construction(tmp_path, monkeypatch):
    paths = make_images(tmp_path / "img")
    data = tmp_path / "pairs.csv"
    data.write_text("image,text\n" + "".join(f"img/{k}.png,item {k}\n" for k in range(4)))
    cache = tmp_path / "cache"
    first = CsvPairDataset(data, image_size=8, cache_dir=cache)
    assert any((cache / "bundles").iterdir()) and len(list((cache / "images" / "8").rglob("*.npy"))) == 4
    clear_memory_cache()
    forbid_decoding(monkeypatch)
    second = CsvPairDataset(data, image_size=8, cache_dir=cache)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first[2][1], second[2][1])
    # another selection of the same files is served by the per-image cache
    loaded, errors = ImageCache(cache).load(paths[:2], 8)
    assert errors == ["", ""] and np.array_equal(loaded, first.images[:2].permute(0, 2, 3, 1).numpy())


def test_changed_file_is_decoded_again(tmp_path):
    paths = make_images(tmp_path / "img", n=2)
    cache = ImageCache(tmp_path / "cache")
    before, _ = cache.load(paths, 8)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(paths[1])
    os.utime(paths[1], ns=(1, 10**18))  # a different mtime for sure
    decoded = cache.decoded
    after, _ = cache.load(paths, 8)
    assert cache.decoded == decoded + 1
    assert np.array_equal(before[0], after[0]) and np.all(after[1] == [1, 2, 3])


def test_memory_only_cache_and_corrupt_cache_file(tmp_path):
    paths = make_images(tmp_path / "img", n=1)
    images, errors = ImageCache(False).load(paths, 8)
    assert errors == [""] and not (tmp_path / "cache").exists()
    cache_dir = tmp_path / "cache"
    reference, _ = ImageCache(cache_dir).load(paths, 8)
    for file in cache_dir.rglob("*.np*"):
        file.write_bytes(b"torn")
    clear_memory_cache()
    fresh = ImageCache(cache_dir)
    again, errors = fresh.load(paths, 8)
    assert errors == [""] and fresh.decoded == 1 and np.array_equal(again, reference)
    assert not list(cache_dir.rglob(".tmp-*")), "no temporary files left behind"


def test_missing_and_corrupt_files_report_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    images, errors = ImageCache(tmp_path / "cache").load([tmp_path / "none.png", tmp_path / "bad.png"], 4)
    assert images.shape == (2, 4, 4, 3) and not images.any()
    assert "not found" in errors[0] and "cannot decode" in errors[1]
    with pytest.raises(ValueError, match="image_size"):
        ImageCache(False).load([], 0)


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("PLAIT_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "plait")


def test_emoji_reads_the_disk_cache(_plait_cache, monkeypatch):
    first = EmojiDataset("test", cache_dir=_plait_cache)
    clear_memory_cache()
    forbid_decoding(monkeypatch)
    second = EmojiDataset("test", cache_dir=_plait_cache)
    assert torch.equal(first.images, second.images)
