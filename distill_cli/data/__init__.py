"""Data: datasets by name -> decoded cache -> subsets -> loaders, in that one direction.

    distill-cli finetune dataset=usps dataset.shots=10 dataset.cache=true

``readers`` (and ``glyphs``, the built-in offline data) read a dataset by name into uint8 arrays,
``streaming`` lists an image folder too large for memory, ``cache`` keeps decoded splits on disk,
``subsets`` loads a split (``load_dataset``: from a dataset config) and draws classes, shots and
validation from it, and ``loaders`` batch it on the device. Nothing here reads Hydra's config or
imports the models.
"""

from distill_cli.data.images import DataError, convert, crop_at
from distill_cli.data.loaders import (
    Augment,
    Batching,
    BatchLoader,
    Normalise,
    Order,
    StreamLoader,
    TransferLoader,
)
from distill_cli.data.readers import DATASETS
from distill_cli.data.streaming import ImageFiles
from distill_cli.data.subsets import (
    Split,
    channel_stats,
    labels_per_class,
    load_dataset,
    load_split,
    select_classes,
    split_indices,
    unlabeled_indices,
)

__all__ = [
    "DATASETS",
    "Augment",
    "BatchLoader",
    "Batching",
    "DataError",
    "ImageFiles",
    "Normalise",
    "Order",
    "Split",
    "StreamLoader",
    "TransferLoader",
    "channel_stats",
    "convert",
    "crop_at",
    "labels_per_class",
    "load_dataset",
    "load_split",
    "select_classes",
    "split_indices",
    "unlabeled_indices",
]
