import codecs
import csv
import json
import os
import re

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
    data = write_csv(tmp_path / "pairs.csv", [("img/0.png", "red"), (str(images[1]), "green")])
    monkeypatch.chdir(tmp_path / "img")
    ds = CsvPairDataset(data, image_size=4)
    assert ds.texts == ["red", "green"] and ds.paths == [tmp_path / "img" / "0.png", images[1]]


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
    with pytest.raises(ValueError, match=r"pairs.json: item 2 \(line 1\): image file not found"):
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
    with pytest.raises(ValueError, match=r"latin.csv: row 1 \(line 2\): not valid UTF-8 \(byte 0xe9 at column 10\)"):
        CsvPairDataset(bad_encoding)


def test_user_split(tmp_path, images):
    data = write_csv(tmp_path / "pairs.csv", [(f"img/{k}.png", f"c{k}") for k in range(5)])
    train = CsvPairDataset(data, split="train", test_fraction=0.4, seed=1, image_size=4)
    test = CsvPairDataset(data, split="test", test_fraction=0.4, seed=1, image_size=4)
    assert len(train) == 3 and len(test) == 2 and sorted(train.texts + test.texts) == [f"c{k}" for k in range(5)]
    with pytest.raises(ValueError, match="the test split is empty"):
        CsvPairDataset(data, split="test", test_fraction=0.01)  # asked for, but rounds to none


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


# --- encodings: the row of a bad byte ----------------------------------------------------------


def test_latin1_rows_are_named_and_skipped_alone(tmp_path, images):
    data = tmp_path / "data.csv"
    data.write_bytes("image,text\nimg/0.png,plain\nimg/1.png,caf\xe9 noir\nimg/2.png,also plain\n".encode("latin-1"))
    with pytest.raises(ValueError) as info:
        CsvPairDataset(data, image_size=4)
    assert str(info.value).startswith(f"{data}: row 2 (line 3): not valid UTF-8 (byte 0xe9 at column 14)")
    ds = CsvPairDataset(data, image_size=4, bad_rows="skip")
    assert ds.texts == ["plain", "also plain"] and ds.rows == [1, 3]
    assert ds.skipped == [{"row": 2, "source": str(data), "reason": "not valid UTF-8 (byte 0xe9 at column 14)"}]


def test_bad_byte_on_a_later_line_of_a_quoted_field(tmp_path, images):
    data = tmp_path / "data.csv"
    data.write_bytes(b'image,text\nimg/0.png,"two\nlines"\nimg/1.png,"first line\nsecond \xff line"\n')
    with pytest.raises(ValueError, match=r"row 2 \(line 4\): not valid UTF-8 \(byte 0xff at line 5, column 8\)"):
        CsvPairDataset(data, image_size=4)
    ds = CsvPairDataset(data, image_size=4, bad_rows="skip")
    assert ds.texts == ["two\nlines"]


def test_header_that_is_not_text_is_a_file_error(tmp_path):
    data = tmp_path / "data.csv"
    data.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError, match=r"data.csv: header \(line 1\): not valid UTF-8 \(byte 0x89 at column 1\); save"):
        CsvPairDataset(data, bad_rows="skip")
    data.write_bytes("image,text\n".encode("utf-16-le"))  # UTF-16 without its byte-order mark
    with pytest.raises(ValueError, match=r"header \(line 1\): contains a NUL character at column 2 \(a UTF-16 file"):
        CsvPairDataset(data)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_unicode_encodings_with_a_byte_order_mark(tmp_path, images, encoding):
    text = "image,text\nimg/0.png,café ☕ 𝄞\nimg/1.png,naïve\n"
    bom = {"utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    data = tmp_path / "data.csv"
    data.write_bytes(bom + text.encode(encoding))
    assert CsvPairDataset(data, image_size=4).texts == ["café ☕ 𝄞", "naïve"]


def test_jsonl_bad_bytes_nul_and_escaped_surrogates(tmp_path, images):
    lines = [
        b'{"image": "img/0.png", "text": "ok"}',
        b'{"image": "img/1.png", "text": "caf\xe9"}',
        b'{"image": "img/2.png", "text": "a\x00b"}',
        b'{"image": "img/3.png", "text": "lone \\ud800"}',
        b'{"image": "img/4.png", "text": "pair \\ud83d\\ude00 and \xe2\x80\xa8 inside"}',
    ]
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"data.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at column 36\) \(2 more"):
        CsvPairDataset(data)
    ds = CsvPairDataset(data, bad_rows="skip", image_size=4)
    assert ds.texts == ["ok", "pair \U0001F600 and \u2028 inside"] and ds.rows == [1, 5]
    assert [s["reason"] for s in ds.skipped] == [
        "not valid UTF-8 (byte 0xe9 at column 36)",
        "contains a NUL character at column 34",
        "column 'text' contains an unpaired surrogate \\ud800 (not valid Unicode)",
    ]


def test_folder_caption_with_a_bad_byte_names_line_and_column(tmp_path):
    folder = folder_with(tmp_path)
    (folder / "1.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"image 1.png: caption file 1.txt: not valid UTF-8 \(byte 0xe9 at line 2, column 4\)"):
        FolderPairDataset(folder)


# --- CSV structure -------------------------------------------------------------------------------


def test_quoted_newlines_delimiters_and_row_numbers(tmp_path, images):
    data = tmp_path / "data.csv"
    data.write_text(
        'image,text\n\nimg/0.png,"a, b\nand ""c"""\nimg/1.png,one\n\nimg/missing.png,gone\n', encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"data.csv: row 3 \(line 7\): image file not found"):
        CsvPairDataset(data, image_size=4)
    ds = CsvPairDataset(data, image_size=4, bad_rows="skip")
    assert ds.texts == ['a, b\nand "c"', "one"] and ds.rows == [1, 2]


def test_extra_fields_nul_and_huge_fields(tmp_path, images):
    huge = "x" * 200_000  # beyond csv's default field limit of 128 KiB
    data = write_csv(tmp_path / "data.csv", [("img/0.png", "cut", "short"), ("img/1.png", huge), ("img/2.png", "n\x00ul")])
    ds = CsvPairDataset(data, image_size=4, bad_rows="skip")
    assert ds.texts == [huge] and ds.rows == [2]
    assert [s["reason"] for s in ds.skipped] == [
        "3 fields but the header has 2 (quote a field that contains ',')",
        "contains a NUL character at column 12",
    ]
    import csv as csv_module

    assert csv_module.field_size_limit() == 131072, "the csv module's limit is restored"


@pytest.mark.parametrize(
    "body,where",
    [
        ('img/0.png,ok\nimg/1.png,"never closed\nimg/2.png,lost\n', "row 2 (line 3)"),
        ('img/0.png,"closed"then text\n', "row 1 (line 2)"),
    ],
)
def test_malformed_quoting_stops_under_either_policy(tmp_path, images, body, where):
    data = tmp_path / "data.csv"
    data.write_text("image,text\n" + body, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"data.csv: {re.escape(where)}: malformed CSV quoting"):
        CsvPairDataset(data, bad_rows="skip", image_size=4)


def test_duplicate_header_column(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("image,text,text\na.png,b,c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header names column 'text' more than once"):
        CsvPairDataset(data)


def test_json_array_items_lines_and_errors(tmp_path, images):
    data = tmp_path / "data.json"
    data.write_text('[\n {"image": "img/0.png", "text": "zero"},\n\n {"image": "img/9.png",\n  "text": "x"}\n]\n')
    with pytest.raises(ValueError, match=r"data.json: item 2 \(line 4\): image file not found"):
        CsvPairDataset(data)
    data.write_text('[{"image": "img/0.png", "text": "zero"},\n {"image": "img/1.png", "text": oops}]')
    with pytest.raises(ValueError, match=r"item 2 \(line 2\): not valid JSON \(Expecting value at line 2, column 33\)"):
        CsvPairDataset(data, bad_rows="skip")
    data.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(ValueError, match=r"item 1 \(line 1\): not valid JSON \(RecursionError"):
        CsvPairDataset(data)


# --- paths outside the data folder, symlinks, pipes --------------------------------------------


def test_relative_paths_may_not_leave_the_data_folder(tmp_path):
    outside = png(tmp_path / "secret.png", (1, 2, 3))
    sub = tmp_path / "shared"
    png(sub / "ok.png", (4, 5, 6))
    (sub / "link.png").symlink_to(outside)
    (sub / "inner").mkdir()
    (sub / "inner" / "up.png").symlink_to("../ok.png")  # a symlink that stays inside is fine
    data = write_csv(sub / "pairs.csv", [("ok.png", "ok"), ("../secret.png", "up"), ("link.png", "link"),
                                         ("inner/up.png", "inner"), (str(outside), "absolute")])
    with pytest.raises(ValueError) as info:
        CsvPairDataset(data, image_size=4)
    assert str(info.value).startswith(f"{data}: row 2 (line 3): image path ../secret.png is outside the data folder {sub}")
    ds = CsvPairDataset(data, image_size=4, bad_rows="skip")
    assert ds.texts == ["ok", "inner", "absolute"] and ds.rows == [1, 4, 5]
    assert torch.all(ds.images[2] == torch.tensor([1, 2, 3])[:, None, None])
    assert [s["reason"] for s in ds.skipped] == [
        f"image path ../secret.png is outside the data folder {sub}",
        f"image path link.png is outside the data folder {sub}",
    ]


def test_folder_symlinks_loops_and_pipes(tmp_path):
    folder = folder_with(tmp_path)
    png(tmp_path / "outside.png", (7, 7, 7))
    (folder / "away.png").symlink_to(tmp_path / "outside.png")
    (folder / "away.txt").write_text("away")
    (folder / "self.png").symlink_to("self.png")
    (folder / "self.txt").write_text("self")
    (folder / "dangling.png").symlink_to("nothing.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "pipe.txt").write_text("pipe")
    os.mkfifo(folder / "2.txt.fifo")
    (folder / "2.txt").unlink()
    (folder / "2.txt").symlink_to(folder / "2.txt.fifo")  # a caption that is a pipe
    (folder / "sub").mkdir()
    png(folder / "sub" / "deep.png", (1, 1, 1))
    (folder / "sub" / "deep.txt").write_text("deep")
    (folder / "sub" / "parent").symlink_to("..")  # a loop if followed
    png(folder / "selfcap.png", (2, 2, 2))
    (folder / "selfcap.txt").symlink_to("selfcap.txt")
    for recursive in (False, True):
        ds = FolderPairDataset(folder, image_size=4, bad_rows="skip", recursive=recursive)
        assert ds.rows == ["0.png", "1.png", "3.jpg"] + (["sub/deep.png"] if recursive else [])
        reasons = {s["row"]: s["reason"] for s in ds.skipped}
        assert reasons == {
            "2.png": "caption file 2.txt is not a regular file",
            "away.png": f"image away.png links outside the data folder {folder}",
            "dangling.png": f"image file not found: {folder / 'dangling.png'} (a dangling symlink?)",
            "pipe.png": f"image path is not a file: {folder / 'pipe.png'}",
            "self.png": f"image path is a symlink loop: {folder / 'self.png'}",
            "selfcap.png": "caption file selfcap.txt is a symlink loop",
        }


# --- splits: no test data, a test table -----------------------------------------------------


def test_no_test_split_is_an_empty_well_formed_dataset(tmp_path, images):
    data = write_csv(tmp_path / "pairs.csv", [(f"img/{k}.png", f"c{k}", f"k{k % 2}") for k in range(5)],
                     header=("image", "text", "kind"))
    test = CsvPairDataset(data, split="test", image_size=6, label_columns="kind")
    assert len(test) == 0 and test.texts == [] and test.alternatives == [] and test.paths == [] and test.rows == []
    assert test.images.shape == (0, 3, 6, 6) and test.images.dtype == torch.uint8 and test.image_size == 6
    assert test.labels["kind"].shape == (0,) and test.labels["kind"].dtype == np.int64
    assert test.class_names == {"kind": ["k0", "k1"]} and test.modalities == ("image", "text")
    assert len(list(DataLoader(test, batch_size=4))) == 0
    assert len(CsvPairDataset(data, split="train", image_size=6)) == 5
    folder_test = FolderPairDataset(folder_with(tmp_path), split="test", image_size=4)
    assert len(folder_test) == 0 and folder_test.images.shape == (0, 3, 4, 4)


def test_test_path_table_and_consistent_class_ids(tmp_path, images):
    train_csv = write_csv(tmp_path / "train.csv", [("img/0.png", "zero", "cat"), ("img/1.png", "one", "dog")],
                          header=("image", "text", "kind"))
    (tmp_path / "held").mkdir()
    png(tmp_path / "held" / "h.png", (9, 9, 9))
    test_jsonl = tmp_path / "held" / "test.jsonl"
    test_jsonl.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "h.png", "text": "held", "kind": "emu"},  # relative to its own folder; a class unseen in training
        {"image": "../img/2.png", "text": "up", "kind": "dog"},
    ]))
    options = dict(test_path=test_jsonl, image_size=4, label_columns="kind")
    with pytest.raises(ValueError, match=r"test.jsonl: line 2: image path ../img/2.png is outside the data folder"):
        CsvPairDataset(train_csv, split="train", **options)  # the test table is checked before training
    train = CsvPairDataset(train_csv, split="train", bad_rows="skip", **options)
    test = CsvPairDataset(train_csv, split="test", bad_rows="skip", **options)
    everything = CsvPairDataset(train_csv, split="all", bad_rows="skip", **options)
    assert train.texts == everything.texts == ["zero", "one"] and test.texts == ["held"]
    assert train.class_names == test.class_names == {"kind": ["cat", "dog", "emu"]}
    assert train.labels["kind"].tolist() == [0, 1] and test.labels["kind"].tolist() == [2]
    assert test.source == test_jsonl and test.skipped[0]["row"] == 2 and train.skipped == []
    assert torch.all(test.images[0] == 9)
    with pytest.raises(ValueError, match="give test_path or test_fraction, not both"):
        CsvPairDataset(train_csv, test_path=test_jsonl, test_fraction=0.2)
    with pytest.raises(ValueError, match="data file not found"):
        CsvPairDataset(train_csv, test_path=tmp_path / "nope.csv")


def test_undecodable_file_names_are_shown_escaped(tmp_path):
    folder = folder_with(tmp_path)
    Image.new("RGB", (4, 4)).save(os.fsencode(folder) + b"/caf\xe9.png")  # a name that is not UTF-8
    with pytest.raises(ValueError, match=re.escape("image caf\\xe9.png: caption file caf\\xe9.txt not found")):
        FolderPairDataset(folder)
    ds = FolderPairDataset(folder, bad_rows="skip", image_size=4)
    assert ds.skipped == [{"row": "caf\\xe9.png", "source": str(folder), "reason": "caption file caf\\xe9.txt not found"}]
    report = json.loads(ds.write_skipped(tmp_path / "run").read_text(encoding="utf-8"))
    assert report["skipped"][0]["row"] == "caf\\xe9.png"


def test_file_names_with_a_newline_are_shown_escaped_on_one_line(tmp_path):
    """A file name may hold a newline (or a tab, an escape): the message naming it stays one line."""
    folder = folder_with(tmp_path)
    (folder / "bad\nname.png").write_bytes(b"not an image")
    (folder / "bad\nname.txt").write_text("a caption")
    (folder / "tab\there.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError) as caught:
        FolderPairDataset(folder)
    message = str(caught.value)
    assert "\n" not in message and "\t" not in message
    assert "image bad\\nname.png: cannot decode image " in message and "(1 more bad rows)" in message
    ds = FolderPairDataset(folder, bad_rows="skip", image_size=4)
    assert sorted(r["row"] for r in ds.skipped) == ["bad\\nname.png", "tab\\there.png"]


def test_the_image_cache_keeps_temporary_files_in_tmp_and_sweeps_stale_ones(tmp_path, images, monkeypatch):
    """A process killed while writing the cache leaves a temporary file in cache/tmp; the next
    process to open the cache removes it once it is an hour old (a younger one may be a write in
    progress), and a load leaves no temporary file anywhere in the cache."""
    import time

    from plait.data import cache

    directory = tmp_path / "cache"
    (directory / "tmp").mkdir(parents=True)
    stale, fresh = directory / "tmp" / ".x.npy.tmp-old", directory / "tmp" / ".y.npy.tmp-new"
    for path in (stale, fresh):
        path.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    monkeypatch.setattr(cache, "_swept", set())
    csv_path = write_csv(tmp_path / "pairs.csv", [(f"img/{k}.png", f"colour {k}") for k in range(5)])
    CsvPairDataset(csv_path, image_size=4, cache_dir=directory)
    assert not stale.exists() and fresh.exists()
    leftovers = [p for p in directory.rglob("*") if ".tmp-" in p.name]
    assert leftovers == [fresh] and len(list((directory / "bundles").glob("*.npz"))) == 1
