"""Datasets of positive pairs (each item carries its index), the image cache and augmentation."""

from plait.data.augment import AUGMENTATIONS, ImageAugment, TextAugment, VectorAugment, default_synonyms
from plait.data.base import ImagePairDataset, PairDataset, collate_pairs, stratified_split
from plait.data.cache import ImageCache, clear_memory_cache, decode_image, default_cache_dir, load_images
from plait.data.digits import DigitsDataset
from plait.data.emoji import EmojiDataset, base_of
from plait.data.registry import build_dataset
from plait.data.subset import SubsetPairDataset, carve_validation
from plait.data.synthetic import InformationGapDataset
from plait.data.tasks import (
    EmojiEntailment,
    EmojiReasoning,
    EmojiVQA,
    TaskSubset,
    build_task,
    carve_task_validation,
    collate_task,
)
from plait.data.uci import UCIMultipleFeatures
from plait.data.user import CsvPairDataset, FolderPairDataset

__all__ = [
    "AUGMENTATIONS",
    "CsvPairDataset",
    "DigitsDataset",
    "EmojiDataset",
    "EmojiEntailment",
    "EmojiReasoning",
    "EmojiVQA",
    "FolderPairDataset",
    "ImageAugment",
    "VectorAugment",
    "ImageCache",
    "ImagePairDataset",
    "InformationGapDataset",
    "PairDataset",
    "SubsetPairDataset",
    "TaskSubset",
    "TextAugment",
    "UCIMultipleFeatures",
    "base_of",
    "build_dataset",
    "build_task",
    "carve_task_validation",
    "collate_task",
    "carve_validation",
    "clear_memory_cache",
    "collate_pairs",
    "decode_image",
    "default_cache_dir",
    "default_synonyms",
    "load_images",
    "stratified_split",
]
