"""Image folders streamed from their files give the batches the in-memory path gives."""

# The loaders take Normalise / Order / Augment objects since issue 21 (at most 8 parameters);
# the constructor calls below changed with them, their assertions did not.

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from distill_cli.data import (
    Augment,
    BatchLoader,
    DataError,
    ImageFiles,
    Normalise,
    Order,
    StreamLoader,
    channel_stats,
    convert,
    load_split,
    select_classes,
)
from distill_cli.data.subsets import Storage
from distill_cli.stages import run_stage


def _folder(root, per_class: int = 5, size=(9, 7)) -> None:
    """train/<class>/ with random RGB PNGs; one image per class has another size (resized)."""
    rng = np.random.default_rng(0)
    for cls in ("ant", "bee", "cow"):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if i < per_class - 1 else (5, 4, 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def _both(root, **convert_args):
    """The same folder decoded into memory and left on disk (1 worker process)."""
    memory = load_split("imagefolder", str(root), True, storage=Storage(stream=False))
    streamed = load_split("imagefolder", str(root), True, storage=Storage(stream=True, workers=1))
    assert isinstance(streamed.x, ImageFiles) and isinstance(memory.x, torch.Tensor)
    assert torch.equal(memory.y, streamed.y) and memory.class_names == streamed.class_names
    return (convert(memory.x, **convert_args), memory.y), (convert(streamed.x, **convert_args),
                                                          streamed.y)  # fmt: skip


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("convert_args", [{}, {"image_size": 6, "channels": 1}])
def test_streamed_batches_equal_in_memory_without_augmentation(tmp_path, convert_args):
    _folder(tmp_path)
    (mx, my), (sx, sy) = _both(tmp_path, **convert_args)
    assert sx.shape == mx.shape
    mean, std = channel_stats(mx)
    assert channel_stats(sx) == (mean, std)  # one chunk each: the same sums
    norm = Normalise(mean, std)
    _same(_batches(BatchLoader(mx, my, 4, norm)), _batches(StreamLoader(sx, sy, 4, norm)))


def test_streamed_augmentation_is_deterministic_and_matches_memory(tmp_path):
    _folder(tmp_path)
    (mx, my), (sx, sy) = _both(tmp_path)
    idx = torch.tensor([0, 2, 3, 5, 7, 8, 9, 11, 12, 14])  # a subset, as the stage takes
    aug = dict(order=Order(shuffle=True, drop_last=True, seed=3), augment=Augment(2, flip=True))
    norm = Normalise([0.5] * 3, [0.25] * 3)
    memory, streamed = (
        BatchLoader(mx[idx], my[idx], 4, norm, **aug),
        StreamLoader(sx[idx], sy[idx], 4, norm, **aug),
    )
    assert len(streamed) == len(memory) == 2
    for epoch in (0, 1):
        memory.set_epoch(epoch)
        streamed.set_epoch(epoch)
        first = _batches(streamed)
        _same(first, _batches(streamed))  # same seed and epoch: same batches
        _same(first, _batches(memory))
    streamed.set_epoch(0)
    assert not torch.equal(
        torch.cat([x for x, _ in _batches(streamed)]), torch.cat([x for x, _ in first])
    )


def test_image_files_index_and_select_classes(tmp_path):
    _folder(tmp_path, per_class=2)
    split = load_split("imagefolder", str(tmp_path), True, storage=Storage(stream=True, workers=0))
    picked = select_classes(split, ["cow", "ant"])
    assert picked.y.tolist() == [1, 1, 0, 0] and picked.class_names == ["cow", "ant"]
    assert [p.split("/")[-2] for p in picked.x.paths] == ["ant", "ant", "cow", "cow"]
    assert split.x[torch.tensor([5, 0])].paths == [split.x.paths[5], split.x.paths[0]]
    assert split.x.shape == (6, 3, 7, 9) and split.x.nbytes == 6 * 3 * 7 * 9
    assert convert(split.x, 4, 1).shape == (6, 1, 4, 4)


def test_streams_when_over_the_memory_budget(tmp_path, caplog):
    _folder(tmp_path, per_class=2)
    caplog.set_level(logging.INFO, "distill_cli")
    small = load_split(
        "imagefolder", str(tmp_path), True, storage=Storage(stream=None, max_memory_gb=1)
    )
    big = load_split(
        "imagefolder", str(tmp_path), True, storage=Storage(stream=None, max_memory_gb=1e-9)
    )
    assert isinstance(small.x, torch.Tensor) and isinstance(big.x, ImageFiles)
    assert "max_memory_gb" in caplog.text


def test_unreadable_files_stop_or_are_skipped(tmp_path, caplog):
    _folder(tmp_path, per_class=3)
    (tmp_path / "train" / "bee" / "broken.png").write_bytes(b"not an image")
    for bad, workers in (("error", 0), ("skip", 1)):
        storage = Storage(stream=True, workers=workers)
        split = load_split("imagefolder", str(tmp_path), True, bad_images=bad, storage=storage)
        loader = StreamLoader(split.x, split.y, 4, Normalise([0] * 3, [1] * 3))
        if bad == "error":
            with pytest.raises(DataError, match="broken.png"):
                list(loader)
        else:
            assert sum(len(y) for _, y in loader) == 9 and "skipped 1 unreadable" in caplog.text


def test_streamed_stage_trains_like_the_in_memory_one(tmp_path, make_cfg):
    _folder(tmp_path / "imgs", per_class=6, size=(8, 8))
    args = ["stage=pretrain", "dataset=imagefolder", f"dataset.root={tmp_path}/imgs",
            "model=cnn_padded", "stage.epochs=2", "stage.batch_size=4", "dataset.val_per_class=1",
            "dataset.cache=false"]  # fmt: skip
    run_stage(make_cfg(*args, "run=memory", "dataset.stream=false"))
    run_stage(make_cfg(*args, "run=stream", "dataset.stream=true", "dataset.workers=1"))
    out = tmp_path / "outputs"
    assert "streaming them from the files" in (out / "stream/pretrain/stage.log").read_text()

    def losses(run):
        rows = (out / run / "pretrain" / "metrics.jsonl").read_text().splitlines()
        return [(r["train_loss"], r["val_acc"]) for r in map(json.loads, rows)]

    assert losses("stream") == losses("memory")
