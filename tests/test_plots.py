"""Every plot writes a real PNG; confusion counts against a hand count."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distill_cli.evaluation.plots import (
    confusion_counts,
    confusion_matrix,
    learning_curves,
    tradeoff,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5000


def history(scale: float, with_kd: bool) -> list[dict]:
    rows = []
    for epoch in range(1, 4):
        row = {"epoch": epoch, "train_loss": scale / epoch, "train_acc": 50.0 + epoch}
        row["train_ce"] = 0.6 * scale / epoch
        if with_kd:
            row["train_kd"] = 0.4 * scale / epoch
        if epoch > 1:  # a row without validation, as when val_every > 1
            row["val_acc"] = 60.0 + 10 * epoch * scale
        rows.append(row)
    return rows


def test_learning_curves(tmp_path):
    path = learning_curves(
        {"teacher": history(1.0, with_kd=False), "student-kd": history(0.8, with_kd=True)},
        tmp_path / "sub" / "curves.png",
    )
    assert path == tmp_path / "sub" / "curves.png"
    assert_png(path)


def test_tradeoff(tmp_path):
    points = [
        {"tag": "teacher", "model": "resnet", "top1": 92.0, "macs": 5e8},
        {"tag": "student-kd", "model": "cnn", "top1": 88.5, "macs": 2e6},
        {"tag": "student-ce", "model": "cnn", "top1": 86.0, "macs": 2e6},
        {"tag": "no-cost", "role": "student", "top1": 80.0},  # skipped: no x value
    ]
    assert_png(tradeoff(points, "macs", tmp_path / "macs.png", xlabel="MACs per image"))
    path = tradeoff(points, "macs", tmp_path / "lin.png", xlabel="MACs per image", log_x=False)
    assert_png(path)


@pytest.mark.parametrize("classes", [3, 40])
def test_confusion_matrix(tmp_path, classes):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (200,), generator=generator)
    predictions = torch.where(torch.rand(200, generator=generator) < 0.7, labels, 0)
    names = [f"class {i}" for i in range(classes)]
    path = confusion_matrix(labels, predictions, names, tmp_path / "cm.png", title="test split")
    assert_png(path)


def test_confusion_counts_by_hand():
    labels = torch.tensor([0, 0, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2, 0])
    counts = confusion_counts(labels, predictions, 3)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert confusion_counts(labels, predictions, 4).sum() == 5
    with pytest.raises(ValueError, match="lie in"):
        confusion_counts(labels, predictions, 2)


def test_import_is_cheap():
    code = (
        "import sys, distill_cli.evaluation.plots; "
        "print({'matplotlib', 'torch'} & set(sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"
