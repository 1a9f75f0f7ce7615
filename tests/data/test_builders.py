import csv
import unicodedata

import numpy as np
import pytest
from PIL import Image

from plait.cli import main
from plait.data import CsvPairDataset, build_dataset, builders
from plait.data.builders import BUILDERS, build_csv_dataset

LABELS = ["script", "block", "category"]


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def char_of(path):
    return chr(int(path.stem[1:], 16))  # images/u00c0.png -> "À"


def test_glyphs_build_loads_through_the_csv_loader(tmp_path):
    path = build_csv_dataset("glyphs", tmp_path / "glyphs", limit=40)
    assert path == tmp_path / "glyphs" / "pairs.csv"
    data = CsvPairDataset(path, text_column="caption", label_columns=LABELS)
    assert len(data) == 40 and data.skipped == []
    chars = [char_of(p) for p in data.paths]
    # captions are the characters' Unicode names, from an independent lookup
    assert data.texts == [unicodedata.name(c).lower() for c in chars]
    assert len(set(data.texts)) == 40
    assert all(unicodedata.category(c)[0] in "LNPS" for c in chars)
    assert chars == sorted(chars)
    # the limit spreads over the code points: not only Basic Latin
    assert len(set(data.class_names["script"])) > 3 and max(map(ord, chars)) > 0x2000
    assert data.images.shape == (40, 3, 32, 32)
    flat = data.images.flatten(1)  # uint8
    assert (flat.amin(1) < 128).all() and (flat.amax(1) == 255).all()  # ink on a white background
    assert len({tuple(row.tolist()) for row in flat}) == 40  # no two images alike
    for p in data.paths:
        with Image.open(p) as image:
            assert image.size == (32, 32) and image.mode == "L"


def test_packaged_config_options_read_the_build(tmp_path):
    from plait.config import load_config

    path = build_csv_dataset("glyphs", tmp_path, limit=50)
    options = dict(load_config("glyphs").data.options, path=str(path))
    train, test = build_dataset("csv", "train", **options), build_dataset("csv", "test", **options)
    assert (len(train), len(test)) == (40, 10)
    assert not set(train.texts) & set(test.texts)
    assert sorted(test.labels) == sorted(LABELS) and test.class_names["script"] == train.class_names["script"]


def test_build_is_byte_identical_and_image_size_applies(tmp_path):
    first = files(build_csv_dataset("glyphs", tmp_path / "a", image_size=48, limit=25).parent)
    second = files(build_csv_dataset("glyphs", tmp_path / "b", image_size=48, limit=25).parent)
    assert first == second and len(first) == 26  # 25 PNGs + pairs.csv
    again = build_csv_dataset("glyphs", tmp_path / "a", image_size=48, limit=25)
    assert files(again.parent) == first
    with Image.open(tmp_path / "a" / next(k for k in first if k.endswith(".png"))) as image:
        assert image.size == (48, 48)
    rows = list(csv.DictReader((tmp_path / "a" / "pairs.csv").open(encoding="utf-8")))
    assert list(rows[0]) == ["image", "caption", *LABELS]


def test_rebuild_drops_stale_images_and_interrupted_build_keeps_old_csv(tmp_path, monkeypatch):
    build_csv_dataset("glyphs", tmp_path, limit=12)
    old_csv = (tmp_path / "pairs.csv").read_bytes()

    def interrupted(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(builders, "atomic_write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_csv_dataset("glyphs", tmp_path, limit=5)
    assert (tmp_path / "pairs.csv").read_bytes() == old_csv
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["pairs.csv"]  # no temporary file left
    monkeypatch.undo()
    build_csv_dataset("glyphs", tmp_path, limit=5)
    assert len(list((tmp_path / "images").iterdir())) == 5
    assert len(CsvPairDataset(tmp_path / "pairs.csv", text_column="caption")) == 5


def test_unknown_names_and_bad_options_raise(tmp_path):
    assert sorted(BUILDERS) == ["glyphs"]
    with pytest.raises(ValueError, match="valid names: glyphs"):
        build_csv_dataset("flags", tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        build_csv_dataset("glyphs", tmp_path, image_size=4)
    with pytest.raises(ValueError, match="limit"):
        build_csv_dataset("glyphs", tmp_path, limit=0)
    assert not (tmp_path / "pairs.csv").exists()


def test_cli_data_build(tmp_path, capsys):
    assert main(["data", "build", "glyphs", "--out", str(tmp_path / "g"), "--limit", "7", "--image-size", "40"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'g' / 'pairs.csv'} (7 items)"
    assert np.asarray(Image.open(next((tmp_path / "g" / "images").iterdir()))).shape == (40, 40)
    assert main(["data", "build", "nope", "--out", str(tmp_path / "n")]) == 2
    assert "valid names: glyphs" in capsys.readouterr().err
