"""Checkpoints: atomic save of the unwrapped model, self-describing and verified load.

Each stage writes ``<run>/<tag>/best.pt`` and ``last.pt``; ``distill-cli finetune run=demo`` reads
``outputs/demo/pretrain/best.pt`` by default, ``stage.from=PATH`` (a stage folder or a checkpoint
file) points elsewhere. Finding them, hashing and atomic writes belong to ``rundir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill_cli.models import build_model
from distill_cli.rundir import (
    REPLACED,
    CheckpointError,
    atomic_write,
    find_checkpoint,
    has_results,
    manifest_path,
    mark_latest,
    move_aside,
    recorded_hashes,
    resolve_run,
    sha256,
    stage_folders,
    stage_input,
)

# The run-directory helpers callers reach through this module (their home is rundir).
__all__ = [
    "FORMAT", "REPLACED", "CheckpointError", "atomic_write", "find_checkpoint", "has_results",
    "load_checkpoint", "mark_latest", "model_from_checkpoint", "move_aside", "resolve_run",
    "save_checkpoint", "sha256", "stage_folders", "stage_input",
]  # fmt: skip

FORMAT = "distill-cli-checkpoint/1"


def save_checkpoint(
    path: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None,
    on_digest: Any = None, **info: Any,
) -> str:  # fmt: skip
    """Save the unwrapped model's weights, its build arguments and plain ``info``; return sha256.

    ``weights`` (a copy of the model's state taken earlier) replace the model's current ones.
    ``on_digest(sha256)`` runs before the new file replaces the old one, so a manifest can
    record the new hash while the old file is still in place.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    state = weights if weights is not None else model.state_dict()
    state = {k: v.detach().cpu() for k, v in state.items()}
    payload = {"format": FORMAT, "model": dict(model.config), "state_dict": state, **info}
    digest: list[str] = []

    def record(tmp: Path) -> None:
        digest.append(sha256(tmp))
        if on_digest is not None:
            on_digest(digest[0])

    atomic_write(path, lambda f: torch.save(payload, f), before_rename=record)
    return digest[0]


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain types, never code.

    With ``verify``, a checkpoint inside a stage folder must match the sha256 its manifest
    recorded when it was written.
    """
    path = Path(path)
    expected = recorded_hashes(path) if verify and path.is_file() else None
    if expected is not None and sha256(path) not in expected:
        raise CheckpointError(
            f"checkpoint '{path}' does not match the sha256 recorded in "
            f"{manifest_path(path.parent)}: it changed after it was written"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' does not exist") from None
    except Exception as exc:  # truncated, corrupted or unsafe pickles all land here
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
        if "Weights only load failed" in text:
            reason = "it holds objects other than tensors and plain types, which could run code"
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded safely: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a distill-cli checkpoint (no '{FORMAT}' marker)")
    return ckpt


def _renamed(model: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The model config, with ``cnn`` read as ``cnn_padded`` where its weights are the padded net's.

    Before 2026-11-29 ``cnn`` named the CNN with padded convs (now ``cnn_padded``); ``cnn`` is the
    seed's unpadded one. An older checkpoint's first linear layer tells them apart.
    """
    weight = state.get("stages.pooled.1.weight")
    if model.get("name") != "cnn" or weight is None:
        return model
    side = int(model.get("image_size", 32)) // 4  # two 2x2 max-pools after same-size convs
    if weight.shape[-1] == 64 * side * side and side > 0:
        return {**model, "name": "cnn_padded"}
    return model


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "") -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights."""
    try:
        model = build_model(**_renamed(ckpt["model"], ckpt["state_dict"]))
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        config = ckpt.get("model", {})
        name = config.get("name", "?") + (f" ({config['arch']})" if config.get("arch") else "")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(
            f"the weights in '{path}' do not fit a {name} model as described ({reason})"
        ) from None
    return model
