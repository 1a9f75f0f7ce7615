"""Build any plait dataset from its name and options, so configs can name one."""

from __future__ import annotations

from plait.data.base import PairDataset
from plait.data.digits import DigitsDataset
from plait.data.emoji import EmojiDataset
from plait.data.synthetic import InformationGapDataset
from plait.data.uci import UCIMultipleFeatures
from plait.data.user import CsvPairDataset, FolderPairDataset
from plait.registry import Registry

DATASETS = Registry("dataset", internal=("split",))
DATASETS.register("emoji", EmojiDataset, aliases=("twemoji",))
DATASETS.register("uci", UCIMultipleFeatures, aliases=("mfeat",))
DATASETS.register("digits", DigitsDataset)
DATASETS.register("csv", CsvPairDataset, aliases=("jsonl",))
DATASETS.register("folder", FolderPairDataset, rename={"path": "folder"})
DATASETS.register("gap", InformationGapDataset)
ALIASES = DATASETS.aliases  # read-only view: alias -> canonical name
# the datasets read from a user's path (option ``path=``), and the constructor parameter it fills
PATH_ARGUMENT = {"csv": "path", "folder": "folder"}


def build_dataset(name: str, split: str = "train", **options) -> PairDataset:
    """``build_dataset("uci", "test", views=("pix", "fou"))`` -> UCIMultipleFeatures.

    Names: emoji, uci, digits, gap (synthetic information gap), csv (``path=`` a .csv/.tsv/.jsonl/.json file; alias jsonl) and
    folder (``path=`` a folder of images with .txt captions). csv and folder default to
    ``split="all"`` when no test_fraction is given, as they have no split of their own. Unknown
    names or options raise a ValueError that lists the valid ones.
    """
    key = DATASETS.resolve(name)
    if key in PATH_ARGUMENT:
        if "path" not in options:
            raise ValueError(f"dataset {key!r} needs path=...")
        if split == "train" and not options.get("test_fraction"):
            split = "all"
    return DATASETS.build(key, fill={"split": split}, **options)
