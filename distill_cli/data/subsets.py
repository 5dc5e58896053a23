r"""A dataset by name as one split in memory, and its subsets: classes, shots, validation.

The stage layer turns the ``dataset`` config group into one call, :func:`load_dataset`::

    distill-cli finetune dataset=usps dataset.root=../shared/data dataset.download=false \
        dataset.shots=10

which amounts to::

    train = load_split("usps", "../shared/data", train=True, download=False)
    train_idx, val_idx = split_indices(train.y, len(train.class_names), shots=10)
    mean, std = channel_stats(train.x[train_idx])
    loader = BatchLoader(train.x[train_idx], train.y[train_idx], 128, mean=mean, std=std,
                         shuffle=True, crop_padding=2, device="cuda")
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from distill_cli.data.cache import CACHE_DIR, SOURCES, cached_read, reader_variant
from distill_cli.data.images import CHUNK, DataError
from distill_cli.data.readers import (
    DATASETS,
    DOWNLOADABLE,
    LAYOUT,
    UnreadableImage,
    read_imagefolder,
)
from distill_cli.data.streaming import ImageFiles, stream_split

log = logging.getLogger("distill_cli")


@dataclass
class Split:
    """One split of a dataset, kept whole in memory.

    Attributes:
        x: Images, uint8, shape (N, C, H, W); or, for a streamed image folder, the
            ``streaming.ImageFiles`` that stand for them.
        y: Labels, int64, shape (N,).
        class_names: Name of each class, indexed by label.
    """

    x: torch.Tensor | ImageFiles
    y: torch.Tensor
    class_names: list[str]


@dataclass(frozen=True)
class Storage:
    """How :func:`load_split` keeps a split: decoded in memory, cached on disk, or streamed.

    Attributes:
        cache: Keep the decoded split in an on-disk cache beside the data (see datacache);
            generated datasets are never cached.
        cache_fallback: The cache folder when the data's root is read-only; None: no cache then.
        stream: Image folders: leave the images on disk as ``streaming.ImageFiles`` (True),
            decode them into memory (False), or stream above ``max_memory_gb`` (None).
        max_memory_gb: Decoded size in GiB above which an image folder streams; None: never.
        workers: Worker processes that decode a streamed image folder.
    """

    cache: bool = False
    cache_fallback: str | None = None
    stream: bool | None = False
    max_memory_gb: float | None = None
    workers: int = 2


def load_split(
    name: str,
    root: str,
    train: bool,
    download: bool = True,
    bad_images: str = "error",
    *,
    storage: Storage = Storage(),
) -> Split:
    """Loads the train or test split of a dataset by name.

    Args:
        name: One of DATASETS.
        root: Folder holding the dataset files, laid out as torchvision expects.
        train: Whether to load the training split (else the test split).
        download: Whether torchvision may download missing files.
        bad_images: For image folders: "error" stops at an unreadable file, "skip" counts and
            skips it.
        storage: Caching and streaming; the default decodes into memory and caches nothing.

    Raises:
        DataError: Unknown name, files missing, unreadable images, or download failed.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; valid: {', '.join(DATASETS)}")
    try:
        if name == "imagefolder" and storage.stream is not False:
            streamed = stream_split(
                root, train, bad_images, storage.stream, storage.max_memory_gb, storage.workers
            )
            if streamed is not None:
                return Split(*streamed)
        if name == "imagefolder":
            read = partial(read_imagefolder, root, train, bad_images)
        else:
            read = partial(DATASETS[name], root, train, download)
        if storage.cache and name in SOURCES:
            variant = reader_variant(name, bad_images)
            return Split(*cached_read(name, root, train, read, storage.cache_fallback, variant))
        return Split(*read())
    except UnreadableImage as exc:
        raise DataError(str(exc)) from None
    # torchvision reports missing files and failed downloads as RuntimeError or OSError
    # (FileNotFoundError, URLError), some with multi-line messages; users get one line.
    except (RuntimeError, OSError) as exc:
        raise DataError(_load_failure(name, root, download, exc)) from exc


def _load_failure(name: str, root: str, download: bool, exc: Exception) -> str:
    """Builds the one-line message for a dataset that could not be read or downloaded."""
    where = os.path.join(root, LAYOUT[name])
    if name not in DOWNLOADABLE:
        return f"dataset '{name}': no images found, expected {where}; set dataset.root=DIR"
    if download:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
        return (
            f"dataset '{name}': could not download or read it into {where} ({reason}); "
            "check the network, or copy the files there and set dataset.download=false"
        )
    # torchvision's own text here suggests download=True, which is not our option's spelling.
    return (
        f"dataset '{name}': files not found or corrupt, expected in {where}; run with "
        "dataset.download=true on a machine with internet, or set dataset.root=DIR"
    )


def load_dataset(d: Mapping[str, Any], train: bool, out_dir: str) -> Split:
    """The train or test split a dataset config names, its ``classes`` selected.

    ``d`` is ``cfg.dataset``, or a checkpoint's copy of it (older ones lack newer keys).
    Decoded splits are cached beside the data, else under ``out_dir``.
    """
    storage = Storage(
        cache=d.get("cache", True),
        cache_fallback=os.path.join(out_dir, CACHE_DIR),
        stream=d.get("stream", False),
        max_memory_gb=d.get("max_memory_gb"),
        workers=d.get("workers", 2),
    )
    split = load_split(
        d["name"], d.get("root") or "data", train, d.get("download", True),
        d.get("bad_images", "error"), storage=storage,
    )  # fmt: skip
    if d.get("classes") is not None:
        split = select_classes(split, list(d["classes"]))
    return split


# ---------------------------------------------------------------------------------------------
# Subsets.


def select_classes(split: Split, classes: list[int | str]) -> Split:
    """Keeps only the listed classes (by index or name), relabelled 0..k-1 in the listed order."""
    indices = [_class_index(c, split.class_names) for c in classes]
    if len(set(indices)) != len(indices):
        raise DataError(f"dataset.classes lists a class twice: {list(classes)}")
    lookup = torch.full((len(split.class_names),), -1, dtype=torch.int64, device=split.y.device)
    lookup[indices] = torch.arange(len(indices), device=split.y.device)
    new_y = lookup[split.y]
    keep = new_y >= 0
    return Split(split.x[keep], new_y[keep], [split.class_names[i] for i in indices])


def _class_index(cls: int | str, names: list[str]) -> int:
    """Resolves a class given by name, index, or index written as a string."""
    if isinstance(cls, str) and cls in names:
        return names.index(cls)
    if isinstance(cls, int) or (isinstance(cls, str) and cls.isdigit()):
        if 0 <= int(cls) < len(names):
            return int(cls)
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    raise DataError(
        f"dataset.classes: no class {cls!r}; valid: indices 0..{len(names) - 1} or names {shown}"
    )


def unlabeled_indices(
    n: int, exclude: torch.Tensor, limit: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Indices in ``0..n-1`` outside ``exclude``; a seeded random ``limit`` of them if given.

    Used for the transfer set: the target's training images that are neither labelled nor held
    out for validation, whose labels distillation never reads.

    Returns:
        Sorted int64 indices.
    """
    keep = torch.ones(n, dtype=torch.bool)
    keep[exclude] = False
    pool = keep.nonzero().flatten()
    if limit is not None and limit < len(pool):
        gen = torch.Generator().manual_seed(seed)
        pool = pool[torch.randperm(len(pool), generator=gen)[:limit]].sort().values
    return pool


def split_indices(
    y: torch.Tensor,
    num_classes: int,
    *,
    val_fraction: float = 0.1,
    val_per_class: int | None = None,
    shots: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws a class-stratified training subset and a disjoint validation set.

    Each class is shuffled once with a generator seeded by ``seed``; training samples are taken
    from the front of that order, validation samples from its end. So a K-shot training set
    contains every smaller-shot set of the same seed, and a validation set of a given size does
    not depend on shots or fraction.

    The few-shot protocol: with ``shots=K`` and no ``val_per_class``, validation holds K images
    per class, so selection never uses more labels than training (``val_per_class=0`` holds out
    none; the caller then keeps the last epoch). ``val_fraction`` applies without ``shots``.

    Args:
        y: Labels, int64, shape (N,).
        num_classes: Number of classes; labels outside 0..num_classes-1 are ignored.
        val_fraction: Fraction of each class held out when neither ``val_per_class`` nor
            ``shots`` is set, in [0, 1).
        val_per_class: Exact number held out per class; overrides both defaults.
        shots: Training samples per class (class-balanced subset).
        fraction: Fraction of each class's remainder used for training, in (0, 1].
        seed: Seed of the shuffle.

    Returns:
        (train_idx, val_idx): sorted, disjoint int64 indices into y.
    """
    _check_split_options(val_fraction, val_per_class, shots, fraction)
    if val_per_class is None and shots is not None:
        val_per_class = shots
    gen = torch.Generator().manual_seed(seed)
    per_class = [_shuffled_class(y, c, gen) for c in range(num_classes)]
    vals, rests = [], []
    for members in per_class:
        n_val = _val_count(len(members), val_fraction, val_per_class)
        vals.append(members[len(members) - n_val :])
        rests.append(members[: len(members) - n_val])
    if shots is not None:
        _check_shots(shots, rests, vals)
        trains = [rest[:shots] for rest in rests]
    elif fraction is not None:
        trains = [rest[: max(1, round(fraction * len(rest)))] for rest in rests]
    else:
        trains = rests
    return _sorted_cat(trains), _sorted_cat(vals)


def labels_per_class(n_images: int, num_classes: int) -> int | float:
    """Labelled images per class of a subset: whole for a balanced one, else the mean to 0.1."""
    per_class = n_images / max(1, num_classes)
    return int(per_class) if per_class == int(per_class) else round(per_class, 1)


def _check_split_options(
    val_fraction: float, val_per_class: int | None, shots: int | None, fraction: float | None
) -> None:
    if not 0 <= val_fraction < 1:
        raise DataError(f"dataset.val_fraction={val_fraction} must be in [0, 1)")
    if val_per_class is not None and val_per_class < 0:
        raise DataError(f"dataset.val_per_class={val_per_class} must be >= 0")
    if shots is not None and shots < 1:
        raise DataError(f"dataset.shots={shots} must be >= 1")
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"dataset.fraction={fraction} must be in (0, 1]")
    if shots is not None and fraction is not None:
        raise DataError("set only one of dataset.shots and dataset.fraction")


def _shuffled_class(y: torch.Tensor, cls: int, gen: torch.Generator) -> torch.Tensor:
    members = (y == cls).nonzero().flatten()
    return members[torch.randperm(len(members), generator=gen)]


def _val_count(n: int, val_fraction: float, val_per_class: int | None) -> int:
    if val_per_class is not None:
        return min(val_per_class, n)
    if val_fraction == 0 or n < 2:
        return 0
    # At least one for validation, at least one left for training.
    return min(max(1, round(val_fraction * n)), n - 1)


def _check_shots(shots: int, rests: list[torch.Tensor], vals: list[torch.Tensor]) -> None:
    """Every class that has images must keep ``shots`` of them after its validation share."""
    for cls, (rest, val) in enumerate(zip(rests, vals, strict=True)):
        if len(rest) + len(val) and len(rest) < shots:
            raise DataError(
                f"dataset.shots={shots} is more than the {len(rest)} images class {cls} has left "
                f"after holding out {len(val)} for validation; lower dataset.shots or "
                "dataset.val_per_class"
            )


def _sorted_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(parts).sort().values


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 NCHW images, in [0, 1] units."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    count = 0
    # streaming.ImageFiles decode their files in chunks, with their workers
    for chunk in x.split(CHUNK) if isinstance(x, torch.Tensor) else x.chunks():
        values = chunk.to(torch.float64) / 255
        total += values.sum((0, 2, 3))
        squares += values.square().sum((0, 2, 3))
        count += chunk.numel() // max(1, x.shape[1])
    count = max(1, count)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return mean.tolist(), std.tolist()
