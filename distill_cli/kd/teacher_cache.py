"""Teacher outputs computed once per (augmentation view, image) and reused.

    distill-cli distill -m run=demo kd.temperature=1,2,4,8 stage.aug_views=8

With ``stage.teacher_cache=true`` (the default) the distill stage asks this cache for the
teacher's logits (and the features its method reads) instead of running the teacher. An entry is
filled the first time its (view, image) pair appears and reused when it comes back: in later
epochs when ``stage.aug_views`` repeats the augmentations, and in every later job of a sweep
that shares the teacher, the data and the augmentation (temperature, weights, student, seed of
the student). The file lives in ``<run>/.teacher_cache/<key>.pt``; the key hashes everything the
outputs depend on. The first batch served from the cache is checked against the live teacher;
a mismatch discards the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("distill_cli")

# Bump when what an entry means changes. 2: the teacher sees its own normalisation (a pretrain
# teacher's entries of format 1 were computed on inputs normalised with the target's statistics).
FORMAT = 2


def cache_key(parts: dict) -> str:
    """A short stable hash of everything the teacher's outputs depend on (JSON-serialisable).

    The installed timm version joins ``parts``: a timm teacher's code may change between versions
    while its checkpoint (hashed in ``parts``, with the architecture, the timm version it was
    built with and where its weights came from) stays the same.
    """
    text = json.dumps({"format": FORMAT, "timm": _version("timm"), **parts}, sort_keys=True,
                      default=str)  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _version(package: str) -> str | None:
    """The installed version of ``package``, or None; read from its metadata, not imported."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _tolerance(dtype: torch.dtype) -> float:
    # Cached and live outputs come from batches of other sizes and compositions; kernels may
    # sum in another order. Half precision leaves fewer exact digits.
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


class TeacherCache:
    """Outputs of ``teacher_fn`` per (view, sample index), filled on first use.

    Args:
        teacher_fn: Maps a batch of images to ``{name: (B, ...) tensor}`` (logits and features).
        num_samples: Size of the index space (the training set, unlabelled images included).
        path: The cache file; loaded if it exists with the same ``key``; None keeps it in memory.
        key: What the outputs depend on, from :func:`cache_key`.
        device: Where the tables live (where the batches are).
    """

    def __init__(
        self,
        teacher_fn: Callable[[Tensor], dict[str, Tensor]],
        num_samples: int,
        path: Path | None = None,
        key: str = "",
        device: torch.device | str = "cpu",
    ) -> None:
        self.teacher_fn, self.num_samples = teacher_fn, num_samples
        self.path, self.key, self.device = path, key, torch.device(device)
        # view -> {"index": sorted sample indices (M,), name: outputs (M, ...)}: only what was seen
        self.views: dict[int, dict[str, Tensor]] = {}
        self.hits = self.misses = 0
        self.loaded = 0  # entries read from the file
        self.verified: bool | None = None  # None: nothing served from the cache yet
        if path is not None and path.exists():
            self._load(path)

    def __call__(self, x: Tensor, index: Tensor, view: Tensor) -> dict[str, Tensor]:
        """Teacher outputs for images ``x`` at dataset rows ``index``, augmented as ``view``.

        Cached rows are served from the cache; the teacher runs on the others only.
        """
        found, cached = self._lookup(index, view)
        if found.any() and self.verified is None:  # the first time: check against the teacher
            live = self.teacher_fn(x)
            self.verified = all(
                torch.allclose(
                    cached[k][found].float(), v[found].float(), rtol=0, atol=_tolerance(v.dtype)
                )  # fmt: skip
                for k, v in live.items()
            )
            if not self.verified:
                log.warning("teacher cache %s disagrees with the live teacher: discarded", self.key)
                self.views.clear()
            self._store(index[~found], view[~found], {k: v[~found] for k, v in live.items()})
            self.misses += int((~found).sum())
            self.hits += int(found.sum()) if self.verified else 0
            return live
        missing = ~found
        self.hits += int(found.sum())
        self.misses += int(missing.sum())
        if not missing.any():
            return cached
        live = self.teacher_fn(x[missing])
        self._store(index[missing], view[missing], live)
        if not found.any():
            return live
        for name, table in live.items():
            cached[name][missing] = table.to(cached[name].dtype)
        return cached

    def _lookup(self, index: Tensor, view: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Which samples of the batch are cached, and their outputs (other rows undefined)."""
        found = torch.zeros(len(index), dtype=torch.bool, device=index.device)
        out: dict[str, Tensor] = {}
        for v in view.unique().tolist():
            entry = self.views.get(v)
            if entry is None or not len(entry["index"]):
                continue
            rows = (view == v).nonzero().flatten()
            pos, hit = _find(entry["index"], index[rows])
            rows, pos = rows[hit], pos[hit]
            found[rows] = True
            for name, table in entry.items():
                if name != "index":
                    if name not in out:
                        out[name] = table.new_zeros((len(index), *table.shape[1:]))
                    out[name][rows] = table[pos]
        return found, out

    def _store(self, index: Tensor, view: Tensor, out: dict[str, Tensor]) -> None:
        for v in view.unique().tolist():
            rows = (view == v).nonzero().flatten()
            new = {"index": index[rows], **{n: t[rows].detach() for n, t in out.items()}}
            self.views[v] = _merge(self.views.get(v), new)

    def stats(self) -> dict:
        """Hits, misses and the file, for the manifest."""
        total = self.hits + self.misses
        return {
            "file": str(self.path) if self.path else None, "key": self.key, "hits": self.hits,
            "misses": self.misses, "hit_rate": round(self.hits / total, 4) if total else None,
            "loaded_entries": self.loaded, "verified": self.verified,
        }  # fmt: skip

    def save(self, write: Callable[[Path, Callable[[Path], None]], None]) -> None:
        """Merge with the file as it is now (another job may have added to it) and write it.

        Args:
            write: An atomic writer ``write(path, fn)`` that calls ``fn(tmp_path)``.
        """
        if self.path is None or self.verified is False:
            return
        if self.path.exists():  # keep what other jobs of the sweep stored meanwhile
            self._load(self.path)
        views = {v: {k: t.cpu() for k, t in entry.items()} for v, entry in self.views.items()}
        payload = {"format": FORMAT, "key": self.key, "num_samples": self.num_samples,
                   "views": views}  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write(self.path, lambda tmp: torch.save(payload, tmp))

    def _load(self, path: Path) -> None:
        try:
            payload = torch.load(path, map_location=self.device, weights_only=True)
            if payload.get("key") != self.key or payload.get("num_samples") != self.num_samples:
                raise ValueError("another key")
        except Exception as exc:  # unreadable or stale: rebuilt, never trusted
            log.warning("teacher cache %s not used (%s)", path, exc)
            return
        for v, entry in payload["views"].items():
            before = len(self.views[v]["index"]) if v in self.views else 0
            self.views[v] = _merge(self.views.get(v), entry)
            self.loaded += len(self.views[v]["index"]) - before


def _find(keys: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of ``index`` in the sorted ``keys``, and which of them are there."""
    pos = torch.searchsorted(keys, index).clamp(max=max(len(keys) - 1, 0))
    found = keys[pos] == index if len(keys) else torch.zeros_like(index, dtype=torch.bool)
    return pos, found


def _merge(entry: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
    """``entry`` plus the rows of ``new`` it lacks, sorted by index."""
    if entry is None:
        order = new["index"].argsort()
        return {name: t[order] for name, t in new.items()}
    _, found = _find(entry["index"], new["index"])
    keep = ~found
    merged = {name: torch.cat([entry[name], new[name][keep]]) for name in entry}
    order = merged["index"].argsort()
    return {name: t[order] for name, t in merged.items()}
