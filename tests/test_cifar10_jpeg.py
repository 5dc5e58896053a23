"""Real CIFAR-10 images (the JPEG tarball in ../shared/data) through the imagefolder path.

A few images per class are taken out of the tarball into a temporary train/test tree in the
tarball's own layout, then read with ``load_split("imagefolder", ...)``, as ``dataset=imagefolder
dataset.root=data/cifar10_jpeg`` (``make cifar10-data``) reads the extracted folder.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from distill_cli.data import load_split

TARBALL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10_jpeg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")  # fmt: skip
PER_CLASS = 3

pytestmark = pytest.mark.skipif(
    not TARBALL.is_file(), reason=f"{TARBALL} is absent (the real CIFAR-10 JPEG files)"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """train/<class>/ and test/<class>/ with the first PER_CLASS images of each class."""
    out = tmp_path_factory.mktemp("cifar10_jpeg")
    wanted = {(split, c): PER_CLASS for split in ("train", "test") for c in CLASSES}
    with tarfile.open(TARBALL, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            key = tuple(parts[:2])
            if member.isfile() and len(parts) == 3 and wanted.get(key, 0) > 0:
                wanted[key] -= 1
                target = out.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
            if not any(wanted.values()):
                break
    assert not any(wanted.values()), "the tarball lacks some class folders"
    return out


@pytest.mark.parametrize("train", [True, False])
def test_real_cifar10_jpegs_load_as_an_image_folder(root, train):
    split = load_split("imagefolder", str(root), train)
    assert split.class_names == list(CLASSES)  # folders sort into CIFAR-10's label order
    assert split.x.shape == (10 * PER_CLASS, 3, 32, 32) and split.x.dtype == torch.uint8
    assert torch.bincount(split.y).tolist() == [PER_CLASS] * 10
    assert 40 < split.x.float().mean() < 200  # real photographs, not blank files
