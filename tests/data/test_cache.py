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
    clear_memory_cache()  # identical files of an earlier test would be served from memory
    cache = ImageCache(tmp_path / "cache")
    before, _ = cache.load(paths, 8)
    assert cache.decoded == 2
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


# --- decoding every mode exactly ---------------------------------------------------------------

from PIL import ImageFile  # noqa: E402

from plait.data.cache import CACHE_VERSION, to_rgb_array  # noqa: E402
from tests.data.fuzz_helpers import composite, encode, grey16_to_8, png_bytes  # noqa: E402


def decode_bytes(tmp_path, data, name="x.png", size=None):
    path = tmp_path / name
    path.write_bytes(data)
    with Image.open(path) as image:
        side = size or min(image.size)
    return decode_image(path, side)


def test_16_bit_grey_gradient_keeps_its_range(tmp_path):
    gradient = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    gradient[7, 7] = 65535
    Image.fromarray(gradient).save(tmp_path / "g.png")  # PIL writes mode I;16
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "I;16"
    out = decode_image(tmp_path / "g.png", 8)
    expected = grey16_to_8(gradient)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0, 0] == 0 and out[7, 7, 0] == 255 and abs(out.mean() / 255 - gradient.mean() / 65535) < 0.002
    # the byte-level PNG encoder gives the same file content semantics, big-endian 16-bit
    np.testing.assert_array_equal(decode_bytes(tmp_path, png_bytes(gradient, 16)), expected)
    # shrinking averages the mapped values (box filter), so the mean stays mid-grey, not white
    assert abs(decode_image(tmp_path / "g.png", 4).mean() - expected.mean()) < 1.0


def test_16_bit_colour_pngs_keep_the_high_byte(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 65536, (5, 5, 3), dtype=np.uint16)
    np.testing.assert_array_equal(decode_bytes(tmp_path, png_bytes(rgb, 16)), (rgb >> 8).astype(np.uint8))
    rgba = rng.integers(0, 65536, (5, 5, 4), dtype=np.uint16)
    expected = composite((rgba[..., :3] >> 8).astype(np.uint8), (rgba[..., 3] >> 8).astype(np.uint8))
    np.testing.assert_array_equal(decode_bytes(tmp_path, png_bytes(rgba, 16)), expected)
    grey_alpha = rng.integers(0, 65536, (5, 5, 2), dtype=np.uint16)
    grey = np.repeat((grey_alpha[..., :1] >> 8).astype(np.uint8), 3, axis=2)
    np.testing.assert_array_equal(
        decode_bytes(tmp_path, png_bytes(grey_alpha, 16)), composite(grey, (grey_alpha[..., 1] >> 8).astype(np.uint8))
    )


def test_colour_keys_are_transparent(tmp_path):
    grey16 = np.array([[0, 1000], [1000, 30000]], dtype=np.uint16)
    expected = grey16_to_8(grey16)
    expected[grey16 == 1000] = 255
    np.testing.assert_array_equal(decode_bytes(tmp_path, png_bytes(grey16, 16, transparency=(1000,))), expected)
    grey8 = np.array([[0, 7], [7, 100]], dtype=np.uint8)
    expected = np.repeat(grey8[..., None], 3, axis=2)
    expected[grey8 == 7] = 255
    np.testing.assert_array_equal(decode_bytes(tmp_path, png_bytes(grey8, 8, transparency=(7,))), expected)
    rgb8 = np.array([[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [0, 0, 0]]], dtype=np.uint8)
    expected = rgb8.copy()
    expected[(rgb8 == [1, 2, 3]).all(axis=2)] = 255
    np.testing.assert_array_equal(decode_bytes(tmp_path, png_bytes(rgb8, 8, transparency=(1, 2, 3))), expected)


def test_palette_with_and_without_transparency(tmp_path):
    rng = np.random.default_rng(2)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 6), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "p.png", 6), palette[index])
    alpha = rng.integers(0, 256, 16, dtype=np.uint8)
    image.save(tmp_path / "pa.png", transparency=alpha.tobytes())
    with Image.open(tmp_path / "pa.png") as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
    np.testing.assert_array_equal(decode_image(tmp_path / "pa.png", 6), composite(palette[index], alpha[index]))
    image.save(tmp_path / "p.gif", transparency=3)  # GIF: one transparent index
    expected = palette[index].copy()
    expected[index == 3] = 255
    np.testing.assert_array_equal(decode_image(tmp_path / "p.gif", 6), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "RGB"])
def test_eight_bit_modes(tmp_path, mode):
    rng = np.random.default_rng(3)
    channels = {"RGBA": 4, "LA": 2, "L": 1, "1": 1, "RGB": 3}[mode]
    pixels = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
    if mode == "1":
        bits = pixels[..., 0] > 127
        Image.fromarray(bits).save(tmp_path / "x.png")
        expected = np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
    else:
        Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode).save(tmp_path / "x.png")
        colour = pixels[..., :3] if channels >= 3 else np.repeat(pixels[..., :1], 3, axis=2)
        expected = composite(colour, pixels[..., -1]) if mode in ("RGBA", "LA") else colour
    with Image.open(tmp_path / "x.png") as image:
        assert image.mode == mode
    np.testing.assert_array_equal(decode_image(tmp_path / "x.png", 5)[:, :5], expected[:, 1:6])  # centre crop of 7


def test_32_bit_float_and_cmyk_tiffs(tmp_path):
    rng = np.random.default_rng(4)
    ints = rng.integers(-1000, 70000, (4, 4)).astype(np.int32)
    Image.fromarray(ints, "I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "i.tif", 4), grey16_to_8(ints))
    floats = rng.uniform(-0.5, 1.5, (4, 4)).astype(np.float32)
    floats[0, 0] = np.nan
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    expected = np.rint(np.clip(np.nan_to_num(floats.astype(np.float64)), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(tmp_path / "f.tif", 4), np.repeat(expected[..., None], 3, axis=2))
    cmyk = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    expected = 255 * (1 - c / 255) * (1 - k / 255)
    assert np.abs(decode_image(tmp_path / "c.tif", 4).astype(np.float64) - expected).max() <= 1.0


def test_premultiplied_modes_in_memory():
    rgba = np.array([[[100, 50, 20, 128], [0, 0, 0, 0]]], dtype=np.uint8)
    out = to_rgb_array(Image.frombytes("RGBa", (2, 1), rgba.tobytes()))
    np.testing.assert_array_equal(out, [[[227, 177, 147], [255, 255, 255]]])  # c_premultiplied + 255 - a
    out = to_rgb_array(Image.frombytes("La", (2, 1), rgba[..., [0, 3]].tobytes()))
    np.testing.assert_array_equal(out, [[[227, 227, 227], [255, 255, 255]]])


# --- truncated, corrupt and mislabelled files ----------------------------------------------------


@pytest.mark.parametrize("ext", ["png", "jpg", "jpeg", "webp", "bmp"])
def test_truncated_and_corrupt_files_are_errors(tmp_path, ext, monkeypatch):
    pixels = np.random.default_rng(5).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    data = encode(pixels, ext)
    cuts = [0, 1, 8, len(data) // 3, len(data) // 2, len(data) - 60]
    files = []
    for cut in cuts:
        files.append(tmp_path / f"cut{cut}.{ext}")
        files[-1].write_bytes(data[:cut])
    files.append(tmp_path / f"garbage.{ext}")
    files[-1].write_bytes(bytes(range(256)) * 3)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a caller's setting does not matter
    images, errors = ImageCache(False).load(files, 4)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the caller's setting is restored"
    for file, error in zip(files, errors):
        assert error.startswith(f"cannot decode image {file}: "), error
        assert "truncated or corrupt" in error or "not recognised" in error, error
    assert "not a PNG, JPEG, WebP, BMP, GIF or TIFF image" in errors[-1]
    assert not images.any()


def test_content_decides_the_format_not_the_extension(tmp_path):
    pixels = np.random.default_rng(6).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    (tmp_path / "png.jpg").write_bytes(encode(pixels, "png"))
    (tmp_path / "bmp.webp").write_bytes(encode(pixels, "bmp"))
    Image.fromarray(pixels).save(tmp_path / "tga.png", "TGA")  # a format without a signature
    images, errors = ImageCache(False).load([tmp_path / "png.jpg", tmp_path / "bmp.webp", tmp_path / "tga.png"], 4)
    assert errors[:2] == ["", ""] and np.array_equal(images[0], pixels) and np.array_equal(images[1], pixels)
    assert "not a PNG, JPEG, WebP, BMP, GIF or TIFF image" in errors[2]


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: over the warning limit
    _, errors = ImageCache(False).load([tmp_path / "big.png"], 4)
    assert "image too large" in errors[0] and "decompression bomb" in errors[0]


def test_pipes_and_symlink_loops_are_errors_without_opening(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block forever
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "dir.png").mkdir()
    _, errors = ImageCache(False).load([tmp_path / "pipe.png", tmp_path / "loop.png", tmp_path / "dir.png"], 4)
    assert errors == [
        f"image path is not a file: {tmp_path / 'pipe.png'}",
        f"image path is a symlink loop: {tmp_path / 'loop.png'}",
        f"image path is not a file: {tmp_path / 'dir.png'}",
    ]


# --- the cache keys on content ---------------------------------------------------------------


def test_same_size_and_mtime_but_new_content_gives_the_new_pixels(tmp_path):
    path = tmp_path / "a.bmp"  # BMP: the file size depends on the image size only
    Image.new("RGB", (6, 6), (10, 20, 30)).save(path)
    before_stat = path.stat()
    cache_dir = tmp_path / "cache"
    first, _ = ImageCache(cache_dir).load([path], 6)
    assert np.all(first == [10, 20, 30])
    Image.new("RGB", (6, 6), (200, 100, 50)).save(path)
    os.utime(path, ns=(before_stat.st_atime_ns, before_stat.st_mtime_ns))
    after_stat = path.stat()
    assert (after_stat.st_size, after_stat.st_mtime_ns) == (before_stat.st_size, before_stat.st_mtime_ns)
    second, _ = ImageCache(cache_dir).load([path], 6)  # same process: memory bundle keyed on content too
    assert np.all(second == [200, 100, 50])
    clear_memory_cache()
    fresh = ImageCache(cache_dir)
    third, _ = fresh.load([path], 6)
    assert np.all(third == [200, 100, 50]) and fresh.decoded == 0, "served by the new content's cache entry"
    assert CACHE_VERSION == "2"


def test_identical_files_share_an_entry_and_errors_name_their_own_path(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / folder / "good.png")
    cache_dir = tmp_path / "cache"
    _, errors = ImageCache(cache_dir).load([tmp_path / "one" / "bad.png", tmp_path / "one" / "good.png"], 4)
    assert str(tmp_path / "one" / "bad.png") in errors[0]
    clear_memory_cache()
    cache = ImageCache(cache_dir)
    images, errors = cache.load([tmp_path / "two" / "bad.png", tmp_path / "two" / "good.png"], 4)
    assert cache.decoded == 0 and np.all(images[1] == [1, 2, 3])
    assert errors[0].startswith(f"cannot decode image {tmp_path / 'two' / 'bad.png'}: ") and errors[1] == ""
