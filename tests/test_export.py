"""Export to ONNX and TorchScript: files, hashes, dynamic batch, overwrite guard, check, card."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from distill_cli.evaluation.export import (
    ExportError,
    card_path,
    export_model,
    write_export_card,
)
from distill_cli.models import build_model
from tests.conftest import ONNX

# Our own torch.jit.load below; export_model silences these itself.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

CASES = [("cnn", 3), ("resnet8", 1), ("vit_tiny", 3)]  # (model, in_channels), images 16x16
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
FORMATS = [pytest.param("onnx", marks=ONNX), "torchscript"]


def tiny(name: str = "cnn", channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=5, in_channels=channels, image_size=16)


def run_export(path, fmt: str, images: torch.Tensor) -> torch.Tensor:
    """Run an exported file the way a user would, outside distill_cli."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path))(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch axis
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    return torch.from_numpy(logits)


class Noisy(nn.Module):
    """A model whose output changes on every call, so no export can match it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + torch.rand(x.shape[0], 5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("name", "channels"), CASES)
def test_export_matches_pytorch(tmp_path, name, channels, fmt):
    model = tiny(name, channels)  # left in train mode: export must switch its copy to eval
    path = tmp_path / f"{name}{SUFFIX[fmt]}"
    info = export_model(model, path, fmt, (channels, 16, 16))

    assert model.training  # the caller's module is untouched
    assert info["format"] == fmt and info["path"] == str(path)
    assert info["size_bytes"] == path.stat().st_size > 0
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["max_abs_diff"] < 1e-4
    assert info["input_shape"] == [channels, 16, 16]
    assert ("opset" in info) == (fmt == "onnx") and info.get("opset", 18) >= 17
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left

    images = torch.randn(3, channels, 16, 16)  # a batch size export never saw
    with torch.no_grad():
        expected = model.eval()(images)
    torch.testing.assert_close(run_export(path, fmt, images), expected, atol=1e-4, rtol=1e-3)


def test_existing_file_needs_overwrite(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_model(tiny(), path, "torchscript", (3, 16, 16))
    assert path.read_bytes() == b"old"

    info = export_model(tiny(), path, "torchscript", (3, 16, 16), overwrite=True)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.read_bytes() != b"old"


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'x'; valid: onnx, torchscript"):
        export_model(tiny(), tmp_path / "m", "x", (3, 16, 16))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # trace's own check sees it too
@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_check_raises_and_keeps_old_file(tmp_path, fmt):
    path = tmp_path / f"noisy{SUFFIX[fmt]}"
    path.write_bytes(b"old")
    with pytest.raises(ExportError, match="max abs diff") as err:
        export_model(Noisy(), path, fmt, (1, 4, 4), overwrite=True)
    assert "\n" not in str(err.value)
    assert path.read_bytes() == b"old"  # the failed export never replaced it
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_export_card_round_trip(tmp_path):
    model = tiny("cnn", 1)
    info = export_model(model, tmp_path / "student.pt", "torchscript", (1, 16, 16))
    names = ["a", "b", "c", "d", "e"]
    card = card_path(info["path"])
    assert card == tmp_path / "student.pt.json"
    write_export_card(info, card, model_config=model.config, class_names=names, mean=[0.5],
                      std=[0.25])  # fmt: skip

    data = json.loads(card.read_text())
    assert data["file"] == "student.pt" and data["format"] == "torchscript"
    assert data["model"] == model.config and data["class_names"] == names
    assert data["input"]["mean"] == [0.5] and data["input"]["std"] == [0.25]
    assert data["input"]["shape"] == ["batch", 1, 16, 16]
    for key in ("size_bytes", "sha256", "max_abs_diff"):
        assert data[key] == info[key]

    with pytest.raises(ValueError, match="mean and std"):
        write_export_card(info, card, model_config=model.config, class_names=names,
                          mean=[0.5, 0.5, 0.5], std=[0.25] * 3)  # fmt: skip
