"""Export a trained model to ONNX or TorchScript, check it against PyTorch, describe it in JSON.

The CLI's export step turns a checkpoint into a deployable file and a sidecar card::

    ckpt = load_checkpoint("outputs/demo/distill/best.pt")
    model = model_from_checkpoint(ckpt)
    cfg = model.config
    info = export_model(model, "student.onnx", "onnx", (cfg["in_channels"], 16, 16))
    write_export_card(info, card_path(info["path"]), model_config=cfg,
                      class_names=ckpt["class_names"], mean=ckpt["mean"], std=ckpt["std"])

The exported file takes float32 NCHW images (input ``images``) normalised with the card's
mean and std, accepts any batch size, and returns logits (output ``logits``).
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill_cli.rundir import atomic_write, sha256

FORMATS = ("onnx", "torchscript")
OPSET = 18  # the oldest opset the dynamo exporter translates natively; 17 needs conversion
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
CARD_FORMAT = "distill-cli-export/1"


class ExportError(Exception):
    """An export that failed or whose output disagrees with PyTorch; the message is one line."""


@dataclass(frozen=True)
class Check:
    """How :func:`export_model` compares the exported file's output with PyTorch's.

    Attributes:
        batch: Images in the verification batch.
        atol: Absolute tolerance of the comparison.
        rtol: Relative tolerance of the comparison.
        seed: Seed of the random example and verification batches.
    """

    batch: int = 4
    atol: float = 1e-4
    rtol: float = 1e-3
    seed: int = 0


def export_model(
    model: nn.Module,
    path: str | Path,
    fmt: str,
    input_shape: tuple[int, int, int],
    *,
    check: Check = Check(),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``model`` (a copy: the caller's module is left as it is) and verify the file.

    The copy is exported in eval mode, on CPU, in float32, with a dynamic batch axis. It is
    traced on ``check.batch + 1`` images and checked on ``check.batch`` other seeded images, so
    the check also proves the batch axis is dynamic. The file is written beside ``path`` under
    a temporary name, verified there, and only then renamed onto ``path``.

    Args:
        model: The bare module to export (e.g. a student), mapping images to logits.
        path: Destination file.
        fmt: One of ``FORMATS``.
        input_shape: One image's (channels, height, width).
        check: Size, seed and tolerances of the comparison with PyTorch.
        overwrite: Replace an existing file at ``path``.

    Returns:
        format, path, size_bytes, sha256, max_abs_diff, input_shape and (ONNX only) opset.

    Raises:
        ValueError: For an unknown format or a malformed input shape or batch.
        FileExistsError: If ``path`` exists and ``overwrite`` is false.
        ExportError: If exporting fails or the file's output differs from PyTorch's.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    shape = tuple(int(s) for s in input_shape)
    batch = check.batch
    if len(shape) != 3 or min(shape) < 1 or batch < 1:
        raise ValueError(f"need input_shape (C, H, W) and batch >= 1; got {input_shape}, {batch}")
    path = Path(path)
    _refuse_existing(path, overwrite)

    model = copy.deepcopy(getattr(model, "_orig_mod", model))  # torch.compile wraps the module
    model = model.to("cpu", torch.float32).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(check.seed)
    example = torch.randn(batch + 1, *shape, generator=generator)
    images = torch.randn(batch, *shape, generator=generator)
    with torch.no_grad():
        expected = model(images)

    if fmt == "onnx":
        data, run = _to_onnx(model, example), _run_onnx
    else:
        data, run = _to_torchscript(model, example), _run_torchscript
    result: dict[str, Any] = {}

    def verify(tmp: Path) -> None:
        diff = _compare(run(tmp, images), expected, check.atol, check.rtol)
        _refuse_existing(path, overwrite)  # in case the file appeared while we exported
        result.update(sha256=sha256(tmp), max_abs_diff=diff)

    atomic_write(path, lambda f: f.write(data), before_rename=verify)
    info = {"format": fmt, "path": str(path), "size_bytes": path.stat().st_size, **result}
    info["input_shape"] = list(shape)
    if fmt == "onnx":
        info["opset"] = OPSET
    return info


def card_path(export_path: str | Path) -> Path:
    """Where an export's card goes: ``student.onnx`` -> ``student.onnx.json``."""
    export_path = Path(export_path)
    return export_path.with_name(export_path.name + ".json")


def write_export_card(
    info: dict[str, Any],
    path: Path,
    *,
    model_config: dict[str, Any],
    class_names: list[str],
    mean: list[float],
    std: list[float],
) -> None:
    """Write a JSON card at ``path`` holding everything needed to use an exported file.

    Args:
        info: What ``export_model`` returned.
        path: The card's own path, usually ``card_path(info["path"])``; replaced if it exists.
        model_config: The model's ``config`` (its build arguments).
        class_names: Name of each logit, in order.
        mean: Per-channel mean to subtract from images scaled to [0, 1].
        std: Per-channel std to divide by after subtracting ``mean``.

    Raises:
        ValueError: If mean, std or class names do not fit the input shape or model config.
    """
    channels = info["input_shape"][0]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"need {channels} mean and std values; got {len(mean)} and {len(std)}")
    num_classes = model_config.get("num_classes", len(class_names))
    if len(class_names) != num_classes:
        raise ValueError(f"need {num_classes} class names; got {len(class_names)}")
    card = {
        "card": CARD_FORMAT,
        "file": Path(info["path"]).name,  # relative, so the folder can move
        "format": info["format"],
        "size_bytes": info["size_bytes"],
        "sha256": info["sha256"],
        "max_abs_diff": info["max_abs_diff"],
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", *info["input_shape"]],
            "dtype": "float32",
            "preprocess": "scale pixels to [0, 1], then (x - mean) / std per channel",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(class_names)]},
        "class_names": [str(c) for c in class_names],
        "model": dict(model_config),
    }
    if "opset" in info:
        card["opset"] = info["opset"]
    text = json.dumps(card, indent=2) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def _refuse_existing(path: Path, overwrite: bool) -> None:
    """Raise FileExistsError if ``path`` exists and may not be replaced."""
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"'{path}' already exists; pass overwrite=True to replace it")


def _to_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model as a self-contained ONNX file (weights inside), via the dynamo exporter."""
    try:
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,  # otherwise it prints progress lines to stdout
        )
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {_first_line(exc)}") from exc
    return program.model_proto.SerializeToString()


def _to_torchscript(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model traced to TorchScript, serialised."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        _hide_torchscript_deprecation()
        # Unpacking a fixed-size dim (ViT's q, k, v) warns; a batch-dependent loop would be
        # caught by the check at another batch size, so this one warning adds nothing.
        warnings.filterwarnings("ignore", "Iterating over a tensor", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(model, example)
        except Exception as exc:
            raise ExportError(f"TorchScript trace failed: {_first_line(exc)}") from exc
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    """Check an ONNX file's structure and run it with ONNX Runtime on the CPU."""
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX model is invalid: {_first_line(exc)}") from exc
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot run the export: {_first_line(exc)}") from exc
    return torch.from_numpy(logits)


def _run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    """Load a TorchScript file afresh and run it."""
    with warnings.catch_warnings():
        _hide_torchscript_deprecation()
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return loaded(images)


def _compare(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> float:
    """Max absolute difference; raise ExportError if outside the tolerance."""
    if actual.shape != expected.shape:
        raise ExportError(
            f"exported output has shape {tuple(actual.shape)}, PyTorch {tuple(expected.shape)}"
        )
    diff = (actual.float() - expected).abs().max().item()
    if not torch.allclose(actual.float(), expected, atol=atol, rtol=rtol):
        raise ExportError(
            f"exported output differs from PyTorch: max abs diff {diff:.3g} "
            f"(atol {atol:g}, rtol {rtol:g})"
        )
    return diff


def _hide_torchscript_deprecation() -> None:
    """Silence torch.jit's FutureWarnings: the caller chose TorchScript knowingly."""
    warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)


def _first_line(exc: BaseException) -> str:
    """First line of an exception's message, or its type name."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
