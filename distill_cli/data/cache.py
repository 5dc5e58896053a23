"""An on-disk cache of decoded datasets: a split is decoded once, later loads read one file.

    distill-cli pretrain dataset=mnist dataset.root=../shared/data dataset.download=false

The first load decodes MNIST's training split and writes ``<root>/.distill_cache/mnist-train.pt``
(or ``<out_dir>/.distill_cache/<hash of root>/mnist-train.pt`` when ``root`` is read-only);
later loads read that file. ``dataset.cache=false`` turns the cache off. Generated data (the
glyphs) is never cached.

Each file records a key: a hash of the loader version and of the names, sizes and modification
times of the split's source files. A file whose key differs (the data changed) or that cannot be
read is rebuilt from the source files, with a log line; it is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from distill_cli.data.readers import Arrays
from distill_cli.rundir import atomic_write

log = logging.getLogger("distill_cli")

CACHE_DIR = ".distill_cache"
# Bump when a reader returns other pixels, labels or names for the same files.
LOADER_VERSION = 1
# The files each split is read from, relative to root; a folder stands for every file below it.
SOURCES: dict[str, Callable[[str], list[str]]] = {
    "cifar10": lambda split: ["cifar-10-batches-py"],
    "cifar100": lambda split: ["cifar-100-python"],
    "mnist": lambda split: ["MNIST/raw"],
    "fashion_mnist": lambda split: ["FashionMNIST/raw"],
    "svhn": lambda split: [f"{split}_32x32.mat"],
    "usps": lambda split: ["usps/usps.bz2" if split == "train" else "usps/usps.t.bz2"],
    "stl10": lambda split: ["stl10_binary"],
    "imagefolder": lambda split: [split],
}


def cached_read(
    name: str, root: str, train: bool, read: Callable[[], Arrays], fallback_dir: str | None = None,
    variant: str = "",
) -> Arrays:  # fmt: skip
    """Reads a split from its cache file when the file is current, else with ``read`` (and caches).

    Args:
        name: Dataset name, a key of SOURCES.
        root: The dataset's root folder.
        train: The training split (else the test split).
        read: Decodes the split from its source files.
        fallback_dir: Where caches go when ``root`` is read-only; None skips caching then.
        variant: Anything else that changes what ``read`` returns (part of the key).
    """
    split = "train" if train else "test"
    where = cache_paths(root, fallback_dir, f"{name}-{split}.pt")
    key = source_key(name, root, split, variant)
    if key is not None:
        for path in where:
            if path.is_file() and (arrays := load_entry(path, key)) is not None:
                log.info("%s %s: read from the cache %s", name, split, path)
                return arrays
    start = time.perf_counter()
    arrays = read()
    key = source_key(name, root, split, variant)  # the files may have just been downloaded
    path = next((p for p in where if _writable(p.parent)), None)
    if key is None or path is None:
        log.info("%s %s: not cached, no writable cache folder (%s)", name, split,
                 " or ".join(str(p.parent) for p in where) or "none")  # fmt: skip
        return arrays
    try:
        save_entry(path, key, arrays)
    except OSError as exc:  # a full disk must not stop training
        log.warning("%s %s: could not write the cache %s (%s)", name, split, path, exc.strerror)
        return arrays
    log.info("%s %s: decoded in %.1f s, cached to %s", name, split,
             time.perf_counter() - start, path)  # fmt: skip
    return arrays


def reader_variant(name: str, bad_images: str = "error") -> str:
    """What besides the files changes a reader's output: its options, its decoder's version."""
    if name == "imagefolder":
        return f"bad_images={bad_images},pillow={version('pillow')}"
    return f"torchvision={version('torchvision')}"


def source_key(name: str, root: str, split: str, variant: str = "") -> str | None:
    """Hash of the loader version and the split's source files; None when there are none."""
    files = []
    for rel in SOURCES[name](split):
        top = os.path.join(root, rel)
        paths = [top] if os.path.isfile(top) else _walk(top)
        for path in paths:
            stat = os.stat(path)
            files.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns))
    if not files:
        return None
    text = json.dumps([LOADER_VERSION, name, split, variant, sorted(files)])
    return hashlib.sha256(text.encode()).hexdigest()


def _walk(folder: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


def cache_paths(root: str, fallback_dir: str | None, filename: str) -> list[Path]:
    """The cache file beside the data, then the one in the fallback folder."""
    where = [Path(root) / CACHE_DIR / filename]
    if fallback_dir is not None:
        digest = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:12]
        where.append(Path(fallback_dir) / digest / filename)
    return where


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and files can be written into it.

    A folder whose permissions grant no one write access counts as read-only even for root,
    who could write there: shared data folders are marked so.
    """
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not (existing.stat().st_mode & 0o222 and os.access(existing, os.W_OK)):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def save_entry(path: Path, key: str, arrays: Arrays) -> None:
    """Writes a cache file atomically: a crash leaves the old file or the new one."""
    x, y, names = arrays
    entry = {"version": LOADER_VERSION, "key": key, "x": x.contiguous(), "y": y,
             "class_names": list(names)}  # fmt: skip
    atomic_write(path, lambda f: torch.save(entry, f))


def load_entry(path: Path, key: str) -> Arrays | None:
    """The cached arrays when the file is intact and its key is ``key``; else None, logged."""
    try:
        entry = torch.load(path, weights_only=True)  # plain types only: a file cannot run code
    except Exception as exc:  # torch reports a damaged file in many ways
        log.warning("the cache %s is unreadable (%s); rebuilding it", path, type(exc).__name__)
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        log.info("the cache %s is stale (its source files changed); rebuilding it", path)
        return None
    if not _intact(entry):
        log.warning("the cache %s holds malformed data; rebuilding it", path)
        return None
    return entry["x"], entry["y"], entry["class_names"]


def _intact(entry: dict[str, Any]) -> bool:
    x, y, names = entry.get("x"), entry.get("y"), entry.get("class_names")
    return (
        entry.get("version") == LOADER_VERSION
        and isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4
        and isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == (len(x),)
        and isinstance(names, list) and all(isinstance(n, str) for n in names)
        and (len(y) == 0 or (0 <= int(y.min()) and int(y.max()) < len(names)))
    )  # fmt: skip
