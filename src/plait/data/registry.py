"""Build any plait dataset from its name and options, so configs can name one."""

from __future__ import annotations

import inspect

from plait.data.base import PairDataset
from plait.data.digits import DigitsDataset
from plait.data.emoji import EmojiDataset
from plait.data.synthetic import InformationGapDataset
from plait.data.uci import UCIMultipleFeatures
from plait.data.user import CsvPairDataset, FolderPairDataset

DATASETS: dict[str, type[PairDataset]] = {
    "emoji": EmojiDataset,
    "uci": UCIMultipleFeatures,
    "digits": DigitsDataset,
    "csv": CsvPairDataset,
    "folder": FolderPairDataset,
    "gap": InformationGapDataset,
}
ALIASES = {"jsonl": "csv", "mfeat": "uci", "twemoji": "emoji"}
PATH_ARGUMENT = {"csv": "path", "folder": "folder"}


def build_dataset(name: str, split: str = "train", **options) -> PairDataset:
    """``build_dataset("uci", "test", views=("pix", "fou"))`` -> UCIMultipleFeatures.

    Names: emoji, uci, digits, gap (synthetic information gap), csv (``path=`` a .csv/.tsv/.jsonl/.json file; alias jsonl) and
    folder (``path=`` a folder of images with .txt captions). csv and folder default to
    ``split="all"`` when no test_fraction is given, as they have no split of their own. Unknown
    names or options raise a ValueError that lists the valid ones.
    """
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DATASETS:
        valid = ", ".join(sorted([*DATASETS, *ALIASES]))
        raise ValueError(f"unknown dataset {name!r}; valid names: {valid}")
    cls = DATASETS[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "split")]
    if key in PATH_ARGUMENT:
        if "path" not in options:
            raise ValueError(f"dataset {key!r} needs path=...")
        options[PATH_ARGUMENT[key]] = options.pop("path")
        if split == "train" and not options.get("test_fraction"):
            split = "all"
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        shown = ["path" if p == PATH_ARGUMENT.get(key) else p for p in accepted]
        raise ValueError(f"dataset {key!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(shown)}")
    return cls(split=split, **options)
