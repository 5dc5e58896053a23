"""Load time of a dataset split with and without the on-disk cache of decoded images.

    make bench                                       # also writes docs/bench_data_cache.json
    .venv/bin/python bench/data_cache.py --data ../shared/data --out docs/bench_data_cache.json
    .venv/bin/python bench/data_cache.py --data none --images 64 --reps 1   # a smoke run

For MNIST and USPS (real files under --data, read with download=False) and an image folder of
CIFAR-shaped PNGs (as in bench/throughput.py), each repetition times three calls of
``load_split``: without the cache, a first load with an empty cache (decode and write), and a
second load (read the cache). The figures are medians in seconds; torchvision is imported before
timing, as in a stage.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision  # noqa: F401  imported before timing, as every stage does
from common import emit, settings
from throughput import write_images

from distill_cli.data import load_split
from distill_cli.data.cache import cache_paths
from distill_cli.data.subsets import Storage


def _timed(name: str, root: str, cache: bool, fallback: str) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    storage = Storage(cache=cache, cache_fallback=fallback)
    split = load_split(name, root, True, download=False, storage=storage)
    return time.perf_counter() - start, split.x


def measure(name: str, root: str, reps: int) -> dict:
    """Median seconds of a load without the cache, a first and a second load with it."""
    times: dict[str, list[float]] = {"no_cache": [], "first_load": [], "second_load": []}
    with tempfile.TemporaryDirectory() as fallback:
        for _ in range(reps):
            for path in cache_paths(root, fallback, f"{name}-train.pt"):
                path.unlink(missing_ok=True)
            plain, x = _timed(name, root, False, fallback)
            first, _ = _timed(name, root, True, fallback)
            second, cached = _timed(name, root, True, fallback)
            assert torch.equal(x, cached), "the cache returned other pixels"
            for key, value in zip(times, (plain, first, second), strict=True):
                times[key].append(value)
        cache_paths(root, None, f"{name}-train.pt")[0].unlink(missing_ok=True)
    med = {key: statistics.median(v) for key, v in times.items()}
    return {
        "images": len(x),
        "shape": list(x.shape[1:]),
        **{f"{key}_s": round(v, 4) for key, v in med.items()},
        "speedup_second_load": round(med["no_cache"] / med["second_load"], 1),
        "runs_s": {key: [round(t, 4) for t in v] for key, v in times.items()},
    }


def main() -> None:
    """Run the measurements and print one JSON document (also written with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="MNIST and USPS; 'none' skips")
    parser.add_argument("--images", type=int, default=10_000, help="PNGs in the image folder")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    if args.data != "none" and os.path.isdir(os.path.join(args.data, "MNIST")):
        for name in ("mnist", "usps"):
            results[name] = measure(name, args.data, args.reps)
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images)
        results["imagefolder"] = measure("imagefolder", tmp, args.reps)
    report = {"settings": settings(args),
              "torch_threads": torch.get_num_threads(), "load": results}  # fmt: skip
    emit(report, args.out)


if __name__ == "__main__":
    main()
