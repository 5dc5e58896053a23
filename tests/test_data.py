"""Tests for distill_cli.data: readers on tiny hand-written files, subsets, stats, loader."""

# The loaders take Normalise / Order / Augment objects since issue 21 (at most 8 parameters);
# the constructor calls below changed with them, their assertions did not.

import bz2
import hashlib
import os
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from distill_cli.data import (
    DATASETS,
    Augment,
    BatchLoader,
    DataError,
    Normalise,
    Order,
    Split,
    channel_stats,
    convert,
    labels_per_class,
    load_split,
    select_classes,
    split_indices,
)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
TORCHVISION_NAMES = ["cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "usps", "stl10"]


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def _pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# ---------------------------------------------------------------------------------------------
# Hand-written files in each dataset's on-disk format.


def test_cifar10_files(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": _images(2, 3, 32, 32, seed=i) for i in range(1, 6)}
    batches["test_batch"] = _images(3, 3, 32, 32, seed=9)
    for name, imgs in batches.items():
        labels = [i % 10 for i in range(len(imgs))]
        _pickle(folder / name, {"data": imgs.reshape(len(imgs), -1), "labels": labels})
    names = ["airplane", "automobile", "bird", "cat", "deer"] + [f"c{i}" for i in range(5, 10)]
    _pickle(folder / "batches.meta", {"label_names": names})
    # torchvision checks every batch file and the meta file against the real md5 sums.
    md5 = {name: _md5(folder / name) for name in batches}
    monkeypatch.setattr(
        tvd.CIFAR10,
        "train_list",
        [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)],
    )
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    meta = {"filename": "batches.meta", "key": "label_names", "md5": _md5(folder / "batches.meta")}
    monkeypatch.setattr(tvd.CIFAR10, "meta", meta)

    train = load_split("cifar10", str(tmp_path), train=True, download=False)
    test = load_split("cifar10", str(tmp_path), train=False, download=False)
    assert train.x.shape == (10, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.y.tolist() == [0, 1] * 5 and train.y.dtype == torch.int64
    assert torch.equal(test.x, torch.from_numpy(batches["test_batch"]))
    assert test.class_names == names


def test_cifar100_files(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = {"train": _images(4, 3, 32, 32), "test": _images(2, 3, 32, 32, seed=1)}
    for name, x in imgs.items():
        labels = [99 - i for i in range(len(x))]
        _pickle(folder / name, {"data": x.reshape(len(x), -1), "fine_labels": labels})
    names = [f"fine{i}" for i in range(100)]
    _pickle(folder / "meta", {"fine_label_names": names})
    monkeypatch.setattr(tvd.CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(tvd.CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    meta = {"filename": "meta", "key": "fine_label_names", "md5": _md5(folder / "meta")}
    monkeypatch.setattr(tvd.CIFAR100, "meta", meta)

    train = load_split("cifar100", str(tmp_path), train=True, download=False)
    assert torch.equal(train.x, torch.from_numpy(imgs["train"]))
    assert train.y.tolist() == [99, 98, 97, 96]
    assert train.class_names == names


def _write_idx(folder, prefix: str, imgs: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = imgs.shape
    header = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w))
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + imgs.tobytes())
    header = (0x0801).to_bytes(4, "big") + n.to_bytes(4, "big")
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    train_x = _images(5, 1, 28, 28)[:, 0]
    _write_idx(raw, "train", train_x, np.arange(5))
    _write_idx(raw, "t10k", _images(3, 1, 28, 28, seed=1)[:, 0], np.array([9, 8, 7]))

    train = load_split(name, str(tmp_path), train=True, download=False)
    test = load_split(name, str(tmp_path), train=False, download=False)
    assert torch.equal(train.x, torch.from_numpy(train_x)[:, None])
    assert train.y.tolist() == [0, 1, 2, 3, 4] and test.y.tolist() == [9, 8, 7]
    assert test.x.shape == (3, 1, 28, 28) and test.x.dtype == torch.uint8
    assert len(train.class_names) == 10
    assert train.class_names[0] == ("0 - zero" if name == "mnist" else "T-shirt/top")


def test_svhn_mat_file(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    imgs = _images(4, 3, 32, 32)
    # SVHN stores (H, W, C, N) with label 10 for the digit 0.
    scipy_io.savemat(
        tmp_path / "train_32x32.mat",
        {"X": imgs.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [2], [9]])},
    )
    split_list = dict(tvd.SVHN.split_list)
    split_list["train"] = [None, "train_32x32.mat", _md5(tmp_path / "train_32x32.mat")]
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)

    train = load_split("svhn", str(tmp_path), train=True, download=False)
    assert torch.equal(train.x, torch.from_numpy(imgs))
    assert train.y.tolist() == [0, 1, 2, 9]
    assert train.class_names == [str(i) for i in range(10)]


def test_stl10_binary_files(tmp_path, monkeypatch):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    train_x, test_x = _images(3, 3, 96, 96), _images(2, 3, 96, 96, seed=1)
    # STL-10 stores each channel column-major; labels are 1-based bytes.
    (folder / "train_X.bin").write_bytes(train_x.transpose(0, 1, 3, 2).tobytes())
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 10]))
    (folder / "test_X.bin").write_bytes(test_x.transpose(0, 1, 3, 2).tobytes())
    (folder / "test_y.bin").write_bytes(bytes([5, 6]))
    (folder / "unlabeled_X.bin").write_bytes(b"")  # checked for although never read here
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)) + "\n")
    md5 = {p.name: _md5(p) for p in folder.iterdir()}
    train_files = ["train_X.bin", "train_y.bin", "unlabeled_X.bin"]
    monkeypatch.setattr(tvd.STL10, "train_list", [[f, md5[f]] for f in train_files])
    monkeypatch.setattr(tvd.STL10, "test_list", [[f, md5[f]] for f in ["test_X.bin", "test_y.bin"]])

    train = load_split("stl10", str(tmp_path), train=True, download=False)
    test = load_split("stl10", str(tmp_path), train=False, download=False)
    assert torch.equal(train.x, torch.from_numpy(train_x)) and train.y.tolist() == [0, 1, 9]
    assert torch.equal(test.x, torch.from_numpy(test_x)) and test.y.tolist() == [4, 5]
    assert train.y.dtype == torch.int64 and train.class_names[9] == "k9"


def _libsvm_line(label: int, pixels: np.ndarray) -> str:
    values = pixels.astype(np.float64) / 255 * 2 - 1
    return f"{label} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(values)) + "\n"


def test_usps_bz2_files(tmp_path):
    folder = tmp_path / "usps"
    folder.mkdir()
    # Pixels 0 and 255 survive torchvision's float round trip exactly.
    imgs = (np.random.default_rng(0).integers(0, 2, (3, 16, 16)) * 255).astype(np.uint8)
    for filename, labels in [("usps.bz2", [1, 10, 5]), ("usps.t.bz2", [2, 3, 4])]:
        text = "".join(
            _libsvm_line(lab, img.ravel()) for lab, img in zip(labels, imgs, strict=True)
        )
        (folder / filename).write_bytes(bz2.compress(text.encode()))

    train = load_split("usps", str(tmp_path), train=True, download=False)
    test = load_split("usps", str(tmp_path), train=False, download=False)
    assert torch.equal(train.x, torch.from_numpy(imgs)[:, None])
    assert train.y.tolist() == [0, 9, 4] and test.y.tolist() == [1, 2, 3]
    assert train.class_names == [str(i) for i in range(10)]


def test_imagefolder_pngs(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split in ("train", "test"):
        for cls, colour in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 6), colour).save(tmp_path / split / cls / "a.png")
            # A differently sized grey image: converted to RGB and resized to the first size.
            Image.new("L", (4, 4), 128).save(tmp_path / split / cls / "b.png")

    train = load_split("imagefolder", str(tmp_path), train=True, download=False)
    assert train.x.shape == (4, 3, 6, 8) and train.x.dtype == torch.uint8
    assert train.y.tolist() == [0, 0, 1, 1] and train.class_names == ["cat", "dog"]
    assert train.x[0, :, 0, 0].tolist() == [255, 0, 0]
    assert train.x[1].eq(128).all()


def test_imagefolder_missing_folder(tmp_path):
    with pytest.raises(DataError, match="imagefolder") as err:
        load_split("imagefolder", str(tmp_path), train=True)
    assert str(tmp_path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# Real data and the built-in glyphs.


@pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"real datasets not found at {SHARED}")
@pytest.mark.parametrize(
    ("name", "train", "shape"),
    [
        ("mnist", True, (60000, 1, 28, 28)),
        ("mnist", False, (10000, 1, 28, 28)),
        ("usps", True, (7291, 1, 16, 16)),
        ("usps", False, (2007, 1, 16, 16)),
    ],
)
def test_real_data(name, train, shape):
    split = load_split(name, SHARED, train=train, download=False)
    assert tuple(split.x.shape) == shape and split.x.dtype == torch.uint8
    assert split.y.unique().tolist() == list(range(10))
    assert len(split.class_names) == 10


def test_glyphs_entries_call_make_glyphs(monkeypatch):
    glyphs = pytest.importorskip("distill_cli.data.glyphs")
    calls = []

    def fake(domain, train):
        calls.append((domain, train))
        return torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"]

    monkeypatch.setattr(glyphs, "make_glyphs", fake)
    split = load_split("glyphs_source", "ignored", train=True)
    load_split("glyphs_target", "ignored", train=False)
    assert calls == [("source", True), ("target", False)]
    assert split.class_names == ["a", "b"]


def test_glyphs_real_split():
    pytest.importorskip("distill_cli.data.glyphs")
    split = load_split("glyphs_target", "ignored", train=False, download=False)
    assert split.x.dtype == torch.uint8 and split.x.ndim == 4 and split.x.shape[1] == 3
    assert split.y.dtype == torch.int64 and len(split.y) == len(split.x)


# ---------------------------------------------------------------------------------------------
# Errors from load_split.


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_missing_files_give_one_line_error(tmp_path, name):
    with pytest.raises(DataError) as err:
        load_split(name, str(tmp_path), train=True, download=False)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path) in message and name in message and "dataset.download=true" in message


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'foo'") as err:
        load_split("foo", "/nowhere", train=True)
    assert all(name in str(err.value) for name in DATASETS)


def _fail(*args, **kwargs):
    raise URLError("no network")


def test_failed_download_gives_one_line_error(tmp_path, monkeypatch):
    # MNIST tries each mirror and wraps the errors in a multi-line RuntimeError.
    monkeypatch.setattr(tvd.mnist, "download_and_extract_archive", _fail)
    with pytest.raises(DataError) as err:
        load_split("mnist", str(tmp_path), train=True, download=True)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)

    # CIFAR lets the URLError through as it is.
    monkeypatch.setattr(tvd.cifar, "download_and_extract_archive", _fail)
    with pytest.raises(DataError, match="no network"):
        load_split("cifar10", str(tmp_path), train=True, download=True)


# ---------------------------------------------------------------------------------------------
# convert, select_classes.


def test_convert_resizes_and_keeps_uint8():
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    out = convert(x, image_size=16)
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.uint8
    assert convert(x) is x
    flat = torch.full((1, 1, 28, 28), 77, dtype=torch.uint8)
    assert convert(flat, image_size=32).eq(77).all()


def test_convert_channels():
    x = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    rgb = convert(x, channels=3)
    assert rgb.shape == (2, 3, 5, 5) and all(torch.equal(rgb[:, c], x[:, 0]) for c in range(3))

    pixels = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])
    img = pixels.T.reshape(1, 3, 1, 4).to(torch.uint8)
    assert convert(img, channels=1).flatten().tolist() == [76, 150, 29, 255]
    assert convert(img, image_size=2, channels=1).shape == (1, 1, 2, 2)
    with pytest.raises(DataError, match="dataset.channels"):
        convert(img, channels=2)


def _toy_split() -> Split:
    x = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1)
    return Split(x, torch.tensor([0, 1, 2, 0, 1, 2]), ["ant", "bee", "cow"])


def test_select_classes_by_index_and_name():
    by_index = select_classes(_toy_split(), [2, 0])
    assert by_index.y.tolist() == [1, 0, 1, 0] and by_index.x.flatten().tolist() == [0, 2, 3, 5]
    assert by_index.class_names == ["cow", "ant"]
    by_name = select_classes(_toy_split(), ["bee", "cow"])
    assert by_name.y.tolist() == [0, 1, 0, 1] and by_name.class_names == ["bee", "cow"]


def test_select_classes_bad_class():
    with pytest.raises(DataError, match="'dog'.*0..2.*ant, bee, cow"):
        select_classes(_toy_split(), ["dog"])
    with pytest.raises(DataError, match="no class 3"):
        select_classes(_toy_split(), [3])
    many = Split(torch.zeros(1, 1, 1, 1), torch.zeros(1), [f"n{i}" for i in range(100)])
    with pytest.raises(DataError, match=r"\(100 in all\)"):
        select_classes(many, ["x"])


# ---------------------------------------------------------------------------------------------
# split_indices, channel_stats.


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])


def test_split_indices_shots_balanced_and_disjoint():
    y = _labels([30, 20, 25])
    train, val = split_indices(y, 3, shots=5, seed=1)
    assert torch.bincount(y[train], minlength=3).tolist() == [5, 5, 5]
    # the few-shot protocol: as many validation labels per class as training labels
    assert torch.bincount(y[val], minlength=3).tolist() == [5, 5, 5]
    assert not set(train.tolist()) & set(val.tolist())
    assert train.dtype == torch.int64 and torch.equal(train, train.sort().values)


def test_split_indices_few_shot_validation_can_be_none_or_larger_on_request():
    y = _labels([30, 20])
    train, val = split_indices(y, 2, shots=4, val_per_class=0)
    assert len(val) == 0 and torch.bincount(y[train]).tolist() == [4, 4]
    train, val = split_indices(y, 2, shots=4, val_per_class=10)  # asked for explicitly
    assert torch.bincount(y[val]).tolist() == [10, 10]
    train, val = split_indices(y, 2, shots=4, val_fraction=0.5)  # a fraction is not a budget
    assert torch.bincount(y[val]).tolist() == [4, 4]


def test_split_indices_shots_are_nested_and_validation_fixed_for_its_size():
    y = _labels([50, 50, 50])
    small, val_small = split_indices(y, 3, shots=5, val_per_class=5, seed=2)
    large, val_large = split_indices(y, 3, shots=20, val_per_class=5, seed=2)
    assert set(small.tolist()) < set(large.tolist())
    assert torch.equal(val_small, val_large)
    assert not set(large.tolist()) & set(val_large.tolist())
    _, val_default = split_indices(y, 3, shots=20, seed=2)
    assert set(val_small.tolist()) < set(val_default.tolist())  # 5 of the 20 held out


def test_labels_per_class():
    assert labels_per_class(40, 4) == 10 and isinstance(labels_per_class(40, 4), int)
    assert labels_per_class(7291, 10) == 729.1
    assert labels_per_class(0, 10) == 0


def test_split_indices_determinism():
    y = _labels([30, 30])
    first = split_indices(y, 2, shots=4, seed=3)
    again = split_indices(y, 2, shots=4, seed=3)
    other = split_indices(y, 2, shots=4, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_split_indices_val_options():
    y = _labels([10, 10, 1])
    train, val = split_indices(y, 3, val_per_class=4)
    assert torch.bincount(y[val], minlength=3).tolist() == [4, 4, 1]
    assert len(train) + len(val) == len(y)
    train, val = split_indices(y, 3, val_fraction=0.01)
    assert torch.bincount(y[val], minlength=3).tolist() == [1, 1, 0]  # at least 1, none from 1
    train, val = split_indices(y, 3, val_fraction=0)
    assert len(val) == 0 and len(train) == len(y)


def test_split_indices_fraction_stratified():
    y = _labels([40, 20])
    train, val = split_indices(y, 2, val_fraction=0.0, fraction=0.25)
    assert torch.bincount(y[train], minlength=2).tolist() == [10, 5]
    assert len(val) == 0


def test_split_indices_errors():
    y = _labels([12, 8])
    with pytest.raises(DataError, match=r"dataset\.shots=8.*7 images class 1.*holding out 1"):
        split_indices(y, 2, shots=8, val_per_class=1)  # class 1 keeps 8 - 1 = 7
    with pytest.raises(DataError, match=r"dataset\.shots=5.*3 images class 1.*val_per_class"):
        split_indices(y, 2, shots=5)  # 5 held out for validation leave class 1 with 3
    for kwargs, key in [
        ({"val_fraction": 1.0}, "dataset.val_fraction"),
        ({"shots": 0}, "dataset.shots"),
        ({"fraction": 0.0}, "dataset.fraction"),
        ({"fraction": 1.5}, "dataset.fraction"),
    ]:
        with pytest.raises(DataError, match=key):
            split_indices(y, 2, **kwargs)


def test_channel_stats_matches_torch():
    x = torch.randint(0, 256, (7, 3, 4, 5), dtype=torch.uint8)
    mean, std = channel_stats(x)
    values = x.double() / 255
    assert mean == pytest.approx(values.mean((0, 2, 3)).tolist())
    assert std == pytest.approx(values.std((0, 2, 3), correction=0).tolist())
    _, flat_std = channel_stats(torch.full((2, 1, 3, 3), 9, dtype=torch.uint8))
    assert flat_std == [1e-3]


# ---------------------------------------------------------------------------------------------
# BatchLoader.


def _label_images(n: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel holds their label, so alignment is checkable after shuffling."""
    y = torch.arange(n)
    return y.to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size).clone(), y


def test_loader_length_and_drop_last():
    x, y = _label_images(10)
    assert len(BatchLoader(x, y, 4, Normalise([0], [1]))) == 3
    assert len(BatchLoader(x, y, 4, Normalise([0], [1]), order=Order(drop_last=True))) == 2
    sizes = [
        len(b[1]) for b in BatchLoader(x, y, 4, Normalise([0], [1]), order=Order(drop_last=True))
    ]
    assert sizes == [4, 4]


def test_loader_normalises():
    x = torch.full((3, 3, 2, 2), 200, dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    images, labels = next(iter(BatchLoader(x, torch.zeros(3), 3, Normalise(mean, std))))
    expected = [(200 / 255 - m) / s for m, s in zip(mean, std, strict=True)]
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images[:, :, 0, 0] == pytest.approx(torch.tensor([expected] * 3), abs=1e-5)


def test_loader_shuffle_deterministic_and_aligned():
    x, y = _label_images(20)
    loader = BatchLoader(
        x,
        y,
        8,
        Normalise([0], [1 / 255]),
        order=Order(shuffle=True, seed=5),
        augment=Augment(crop_padding=1),
    )
    first = [b[1] for b in loader]
    assert all(torch.equal(a, b[1]) for a, b in zip(first, loader, strict=True))
    assert sorted(torch.cat(first).tolist()) == list(range(20))
    loader.set_epoch(1)
    assert not torch.equal(torch.cat(first), torch.cat([b[1] for b in loader]))
    for images, labels in loader:
        centre = images[:, 0, 3, 3]  # never reached by padding 1 in a 6x6 image
        assert torch.equal(centre.round().long(), labels)


def test_loader_crop_moves_pixel_at_most_padding():
    n, size, pad = 16, 9, 2
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, 0, 4, 4] = 255
    loader = BatchLoader(x, torch.zeros(n), n, Normalise([0], [1]), augment=Augment(pad))
    images, _ = next(iter(loader))
    assert images.shape == (n, 1, size, size)
    offsets = set()
    for img in images[:, 0]:
        ((row, col),) = img.nonzero().tolist()
        assert abs(row - 4) <= pad and abs(col - 4) <= pad
        offsets.add((row, col))
    assert len(offsets) > 1


def test_loader_flip():
    n = 32
    x = torch.zeros(n, 1, 3, 4, dtype=torch.uint8)
    x[:, 0, :, 0] = 255  # left column lit
    images, _ = next(
        iter(
            BatchLoader(x, torch.zeros(n), n, Normalise([0], [1 / 255]), augment=Augment(flip=True))
        )
    )
    flipped = images[:, 0, 0, -1] > 0
    assert 0 < int(flipped.sum()) < n
    assert torch.equal(images[flipped], x[flipped].flip(-1).float())


def test_loader_channels_last():
    x = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
    loader = BatchLoader(x, torch.zeros(4), 2, Normalise([0] * 3, [1] * 3, channels_last=True))
    images, _ = next(iter(loader))
    assert images.is_contiguous(memory_format=torch.channels_last)
