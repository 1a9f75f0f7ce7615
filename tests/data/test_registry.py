import pytest
from PIL import Image

from plait.data import CsvPairDataset, DigitsDataset, FolderPairDataset, UCIMultipleFeatures, build_dataset


def test_builds_each_dataset(tmp_path):
    assert isinstance(build_dataset("digits", "test"), DigitsDataset)
    uci = build_dataset("uci", "test", views=("kar", "zer"), standardize=False)
    assert isinstance(uci, UCIMultipleFeatures) and uci.dims == (64, 47) and len(uci) == 400
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("black")
    (tmp_path / "pairs.csv").write_text("img,cap\na.png,black\n")
    csv_data = build_dataset("csv", path=tmp_path / "pairs.csv", image_column="img", text_column="cap", image_size=4)
    assert isinstance(csv_data, CsvPairDataset) and csv_data.texts == ["black"] and csv_data.split == "all"
    folder = build_dataset("folder", path=tmp_path, image_size=4)
    assert isinstance(folder, FolderPairDataset) and folder.texts == ["black"]


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid names: .*digits.*emoji.*uci"):
        build_dataset("mnist")
    with pytest.raises(ValueError, match="dataset 'uci' has no option 'colour'; its options: views"):
        build_dataset("uci", colour=1)
    with pytest.raises(ValueError, match="needs path"):
        build_dataset("csv")
    with pytest.raises(ValueError, match="split"):
        build_dataset("digits", "validation")


def test_aliases_and_path_option(tmp_path):
    assert isinstance(build_dataset("MFEAT", "test", views=("kar", "zer")), UCIMultipleFeatures)
    with pytest.raises(ValueError, match="dataset 'folder' has no option 'colour'; its options: path, "):
        build_dataset("folder", path=tmp_path, colour=1)
    (tmp_path / "pairs.csv").write_text("image,text\na.png,black\n")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert build_dataset("jsonl", path=tmp_path / "pairs.csv", image_size=4).split == "all"
