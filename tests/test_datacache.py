"""The on-disk cache of decoded datasets: hit, stale key, corrupt file, read-only data, switch."""

import logging
import os
import shutil

import pytest
import torch
from PIL import Image

from distill_cli.config import ConfigError, check
from distill_cli.data import load_split
from distill_cli.data import subsets as data_module
from distill_cli.data.cache import CACHE_DIR, cache_paths
from distill_cli.data.subsets import Storage
from distill_cli.stages import run_stage


def _folder(root, n: int = 3) -> None:
    """A train/<class>/ tree of n small PNGs per class, each image a different colour."""
    for c, cls in enumerate(("cat", "dog")):
        (root / "train" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 5), (40 * i, 100 * c, 7)).save(root / "train" / cls / f"{i}.png")


def _load(root, fallback=None, **kwargs):
    storage = Storage(cache=True, cache_fallback=fallback)
    return load_split("imagefolder", str(root), True, storage=storage, **kwargs)


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded the images instead of reading the cache")

    monkeypatch.setattr(data_module, "read_imagefolder", refuse)


def test_second_load_reads_the_cache(tmp_path, monkeypatch, caplog):
    _folder(tmp_path)
    caplog.set_level(logging.INFO, "distill_cli")
    first = _load(tmp_path)
    cache_file = tmp_path / CACHE_DIR / "imagefolder-train.pt"
    assert cache_file.is_file() and "cached to" in caplog.text
    _no_decoding(monkeypatch)
    second = _load(tmp_path)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert second.class_names == ["cat", "dog"] and "read from the cache" in caplog.text


def test_changed_files_make_the_cache_stale(tmp_path, caplog):
    _folder(tmp_path)
    _load(tmp_path)
    Image.new("RGB", (6, 5), (1, 2, 3)).save(tmp_path / "train" / "dog" / "new.png")
    caplog.set_level(logging.INFO, "distill_cli")
    again = _load(tmp_path)
    assert "stale" in caplog.text and len(again.x) == 7
    caplog.clear()
    assert len(_load(tmp_path).x) == 7 and "read from the cache" in caplog.text  # rebuilt


def test_options_that_change_the_output_are_part_of_the_key(tmp_path, caplog):
    _folder(tmp_path)
    _load(tmp_path, bad_images="error")
    caplog.set_level(logging.INFO, "distill_cli")
    _load(tmp_path, bad_images="skip")
    assert "stale" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_dtype", "not_a_dict"])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path, caplog, damage):
    _folder(tmp_path)
    expected = _load(tmp_path)
    path = tmp_path / CACHE_DIR / "imagefolder-train.pt"
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        entry = torch.load(path, weights_only=True)
        entry["x"] = entry["x"].float() if damage == "wrong_dtype" else entry["x"]
        torch.save(entry if damage == "wrong_dtype" else [entry["x"]], path)
    caplog.set_level(logging.INFO, "distill_cli")
    again = _load(tmp_path)
    assert torch.equal(again.x, expected.x) and "rebuilding" in caplog.text
    assert torch.load(path, weights_only=True)["x"].dtype == torch.uint8  # a good file again


def test_read_only_data_caches_in_the_fallback_folder(tmp_path, caplog):
    data, fallback = tmp_path / "data", tmp_path / "outputs" / CACHE_DIR
    _folder(data)
    os.chmod(data, 0o555)  # no write bit: read-only even for root
    try:
        caplog.set_level(logging.INFO, "distill_cli")
        _load(data, fallback=None)
        assert "not cached" in caplog.text and not (data / CACHE_DIR).exists()
        _load(data, fallback=str(fallback))
        local, elsewhere = cache_paths(str(data), str(fallback), "imagefolder-train.pt")
        assert not local.exists() and elsewhere.is_file()
        caplog.clear()
        _load(data, fallback=str(fallback))
        assert "read from the cache" in caplog.text
    finally:
        os.chmod(data, 0o755)


def test_generated_data_and_cache_false_write_nothing(tmp_path):
    load_split(
        "glyphs_target",
        str(tmp_path),
        True,
        storage=Storage(cache=True, cache_fallback=str(tmp_path)),
    )
    _folder(tmp_path / "imgs")
    load_split("imagefolder", str(tmp_path / "imgs"), True, storage=Storage(cache=False))
    assert not list(tmp_path.rglob("*.pt"))


def _mnist_test_copy(shared_data, root) -> None:
    """MNIST's test split under root in torchvision's layout, without writing into shared_data.

    The t10k files are copied (7.8 MB). torchvision also insists that the training files exist
    even for the test split; they are links to the shared ones, which nothing here reads.
    """
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copyfile(shared_data / "MNIST" / "raw" / name, raw / name)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (raw / name).symlink_to(shared_data / "MNIST" / "raw" / name)


def test_real_mnist_from_the_cache_equals_torchvision(shared_data, tmp_path, monkeypatch):
    data, fallback = tmp_path / "data", tmp_path / "outputs" / CACHE_DIR
    _mnist_test_copy(shared_data, data)
    plain = load_split("mnist", str(data), False, download=False)

    def load():
        storage = Storage(cache=True, cache_fallback=str(fallback))
        return load_split("mnist", str(data), False, download=False, storage=storage)

    load()
    assert (data / CACHE_DIR / "mnist-test.pt").is_file() and not fallback.exists()

    def refuse(*args, **kwargs):
        raise AssertionError("decoded MNIST instead of reading the cache")

    monkeypatch.setitem(data_module.DATASETS, "mnist", refuse)
    cached = load()
    assert torch.equal(plain.x, cached.x) and torch.equal(plain.y, cached.y)
    assert plain.class_names == cached.class_names and len(cached.x) == 10_000


def test_stage_uses_the_cache_and_the_switch(tmp_path, make_cfg):
    _folder(tmp_path / "imgs", n=4)
    args = ["stage=pretrain", "run=r", "dataset=imagefolder", f"dataset.root={tmp_path}/imgs",
            "model=cnn_padded", "stage.epochs=1", "dataset.val_per_class=1"]  # fmt: skip
    run_stage(make_cfg(*args, "dataset.cache=false"))
    assert not (tmp_path / "imgs" / CACHE_DIR).exists()
    run_stage(make_cfg(*args, "overwrite=true"))
    run_stage(make_cfg(*args, "overwrite=true"))
    log = (tmp_path / "outputs" / "r" / "pretrain" / "stage.log").read_text()
    assert "read from the cache" in log


@pytest.mark.parametrize(
    "override", ["dataset.cache=maybe", "dataset.stream=2", "dataset.max_memory_gb=0",
                 "dataset.workers=-1", "device.amp=sometimes"],
)  # fmt: skip
def test_new_keys_are_checked(make_cfg, override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        check(make_cfg(override))
