import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from plait.data import CsvPairDataset, FolderPairDataset

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def png(path, colour, size=(20, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def write_csv(path, rows, header=("image", "text")):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def images(tmp_path):
    return [png(tmp_path / "img" / f"{k}.png", c) for k, c in enumerate(COLOURS)]


def test_csv_relative_paths_items_and_loader(tmp_path, images):
    data = write_csv(tmp_path / "pairs.csv", [(f"img/{k}.png", f"colour {k}") for k in range(5)])
    ds = CsvPairDataset(data, image_size=8, cache_dir=tmp_path / "cache")
    assert len(ds) == 5 and ds.modalities == ("image", "text") and ds.skipped == []
    for k in range(5):
        i, image, caption = ds[k]
        assert i == k and caption == f"colour {k}" and image.shape == (3, 8, 8)
        expected = torch.tensor(COLOURS[k], dtype=torch.float32) / 255
        torch.testing.assert_close(image, expected[:, None, None].expand(3, 8, 8))
    assert ds.labels == {} and ds.paths[2] == tmp_path / "img" / "2.png"
    index, batch, captions = next(iter(DataLoader(ds, batch_size=4)))
    assert batch.shape == (4, 3, 8, 8) and list(captions) == [f"colour {k}" for k in range(4)]


def test_csv_resolves_against_its_own_folder_not_the_cwd(tmp_path, images, monkeypatch):
    sub = tmp_path / "tables"
    sub.mkdir()
    data = write_csv(sub / "pairs.csv", [("../img/0.png", "red"), (str(images[1]), "green")])
    monkeypatch.chdir(tmp_path / "img")
    ds = CsvPairDataset(data, image_size=4)
    assert ds.texts == ["red", "green"] and ds.paths[1] == images[1]


def test_custom_columns_labels_tsv_and_rgba(tmp_path):
    png(tmp_path / "a.png", (0, 0, 0, 0), mode="RGBA")
    png(tmp_path / "b.png", (0, 0, 0, 255), mode="RGBA")
    data = tmp_path / "pairs.tsv"
    data.write_text("file\tcaption\tkind\na.png\t  clear  \tempty\nb.png\tblack\tfull\n", encoding="utf-8")
    ds = CsvPairDataset(data, image_column="file", text_column="caption", image_size=4, label_columns="kind")
    assert ds.texts == ["clear", "black"]
    assert torch.all(ds[0][1] == 1.0), "fully transparent -> white"
    assert torch.all(ds[1][1] == 0.0)
    assert ds.class_names == {"kind": ["empty", "full"]} and ds.labels["kind"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"pairs.tsv: header has no column 'image'.*'file', 'caption', 'kind'"):
        CsvPairDataset(data)


@pytest.mark.parametrize(
    "row,reason",
    [
        (("img/missing.png", "lost"), "image file not found"),
        (("img/corrupt.png", "broken"), "cannot decode image"),
        (("img/0.png", "   "), "empty caption"),
        (("", "no path"), "empty image path"),
        (("img/0.png",), "missing column 'text'"),
    ],
)
def test_csv_bad_row_error_and_skip(tmp_path, images, row, reason):
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    data = write_csv(tmp_path / "pairs.csv", [("img/1.png", "one"), ("img/2.png", "two"), row, ("img/3.png", "three")])
    with pytest.raises(ValueError) as info:
        CsvPairDataset(data, image_size=4)
    message = str(info.value)
    assert str(data) in message and "row 3 (line 4)" in message and reason in message
    ds = CsvPairDataset(data, image_size=4, bad_rows="skip")
    assert ds.texts == ["one", "two", "three"] and ds.rows == [1, 2, 4]
    assert len(ds.skipped) == 1 and ds.skipped[0]["row"] == 3 and reason in ds.skipped[0]["reason"]
    report = json.loads(ds.write_skipped(tmp_path / "run").read_text(encoding="utf-8"))
    assert (tmp_path / "run" / "skipped_rows.json").is_file()
    assert report["count"] == 1 and report["skipped"][0]["row"] == 3 and report["source"] == str(data)


def test_jsonl_lines_alternatives_and_bad_lines(tmp_path, images):
    lines = [
        json.dumps({"path": "img/0.png", "caption": ["red", "crimson", "red"]}),
        "",
        json.dumps({"path": "img/1.png", "caption": "green"}),
        "{not json",
        json.dumps({"path": "img/2.png"}),
        json.dumps({"path": "img/3.png", "caption": 5}),
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.jsonl: line 4: not valid JSON.*\(2 more bad rows\)"):
        CsvPairDataset(data, image_column="path", text_column="caption")
    ds = CsvPairDataset(data, image_column="path", text_column="caption", bad_rows="skip", image_size=4)
    assert ds.texts == ["red", "green"] and ds.alternatives == [["crimson"], []] and ds.rows == [1, 3]
    assert [s["row"] for s in ds.skipped] == [4, 5, 6]
    assert "missing column 'caption'" in ds.skipped[1]["reason"] and "must be a string" in ds.skipped[2]["reason"]


def test_json_array(tmp_path, images):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([{"image": "img/0.png", "text": "red"}, {"image": "img/9.png", "text": "x"}]))
    with pytest.raises(ValueError, match=r"pairs.json: item 2: image file not found"):
        CsvPairDataset(data)


def test_all_rows_bad_and_bad_policy(tmp_path):
    data = write_csv(tmp_path / "pairs.csv", [("nope.png", "a")])
    with pytest.raises(ValueError, match="no usable rows"):
        CsvPairDataset(data, bad_rows="skip")
    with pytest.raises(ValueError, match="bad_rows must be one of 'error', 'skip'"):
        CsvPairDataset(data, bad_rows="ignore")
    with pytest.raises(ValueError, match="data file not found"):
        CsvPairDataset(tmp_path / "absent.csv")
    bad_encoding = tmp_path / "latin.csv"
    bad_encoding.write_bytes("image,text\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv: not valid UTF-8"):
        CsvPairDataset(bad_encoding)


def test_user_split(tmp_path, images):
    data = write_csv(tmp_path / "pairs.csv", [(f"img/{k}.png", f"c{k}") for k in range(5)])
    train = CsvPairDataset(data, split="train", test_fraction=0.4, seed=1, image_size=4)
    test = CsvPairDataset(data, split="test", test_fraction=0.4, seed=1, image_size=4)
    assert len(train) == 3 and len(test) == 2 and sorted(train.texts + test.texts) == [f"c{k}" for k in range(5)]
    with pytest.raises(ValueError, match="test split is empty"):
        CsvPairDataset(data, split="test")


def folder_with(tmp_path):
    folder = tmp_path / "pairs"
    for k, colour in enumerate(COLOURS[:3]):
        png(folder / f"{k}.png", colour)
        (folder / f"{k}.txt").write_text(f"colour {k}\nalso {k}\n\n", encoding="utf-8")
    Image.new("RGB", (10, 10), (9, 9, 9)).save(folder / "3.jpg")
    (folder / "3.txt").write_text("dark", encoding="utf-8")
    (folder / "notes.md").write_text("ignored")
    return folder


def test_folder_dataset(tmp_path):
    folder = folder_with(tmp_path)
    ds = FolderPairDataset(folder, image_size=6)
    assert ds.texts == ["colour 0", "colour 1", "colour 2", "dark"]
    assert ds.alternatives[0] == ["also 0"] and ds.rows == ["0.png", "1.png", "2.png", "3.jpg"]
    assert all(ds[i][0] == i for i in range(len(ds))) and ds[3][1].shape == (3, 6, 6)


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda f: (f / "1.txt").unlink(), "caption file 1.txt not found"),
        (lambda f: (f / "1.txt").write_bytes(b"caf\xe9 au lait"), "not valid UTF-8"),
        (lambda f: (f / "1.txt").write_text("  \n \n"), "empty caption in 1.txt"),
        (lambda f: (f / "1.png").write_bytes(b"garbage"), "cannot decode image"),
    ],
)
def test_folder_bad_items(tmp_path, damage, reason):
    folder = folder_with(tmp_path)
    damage(folder)
    with pytest.raises(ValueError) as info:
        FolderPairDataset(folder)
    assert str(folder) in str(info.value) and "image 1.png" in str(info.value) and reason in str(info.value)
    ds = FolderPairDataset(folder, bad_rows="skip")
    assert len(ds) == 3 and "colour 1" not in ds.texts
    assert ds.skipped == [{"row": "1.png", "source": str(folder), "reason": ds.skipped[0]["reason"]}]
    assert reason in ds.skipped[0]["reason"]
    report = json.loads(ds.write_skipped(tmp_path / "run").read_text())
    assert report["skipped"][0]["row"] == "1.png"


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="image folder not found"):
        FolderPairDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderPairDataset(tmp_path / "empty")
    folder = folder_with(tmp_path)
    (folder / "deeper").mkdir()
    png(folder / "deeper" / "x.png", (1, 2, 3))
    (folder / "deeper" / "x.txt").write_text("deep")
    assert len(FolderPairDataset(folder)) == 4
    assert FolderPairDataset(folder, recursive=True).rows[-1] == "deeper/x.png"


def test_non_square_images_are_centre_cropped(tmp_path):
    image = np.zeros((10, 30, 3), dtype=np.uint8)
    image[:, 10:20] = 255  # white centre third of a wide image
    Image.fromarray(image).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide")
    ds = FolderPairDataset(tmp_path, image_size=10)
    assert ds.images.shape == (1, 3, 10, 10) and int(ds.images.min()) == 255
