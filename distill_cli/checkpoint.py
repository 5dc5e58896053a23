"""Checkpoints and run directories: atomic save, self-describing load, finding a stage's input.

A run is ``<out_dir>/<run>/``; each stage writes ``<run>/<tag>/`` holding ``best.pt`` and
``last.pt``. ``distill-cli finetune run=demo`` reads ``outputs/demo/pretrain/best.pt`` by default;
``stage.from=PATH`` (a stage folder or a checkpoint file) points elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distill_cli.config import RUN_NAME_FORMAT
from distill_cli.models import build_model

FORMAT = "distill-cli-checkpoint/1"
LATEST = ".latest"  # file in out_dir naming the most recently used run
REPLACED = ".replaced"  # folder in a run where overwritten stage folders are moved
# Which stage feeds which, and the command that makes it (for the "run this first" message).
UPSTREAM = {"finetune": "pretrain", "distill": "finetune"}


class CheckpointError(Exception):
    """A checkpoint or run folder that cannot be used; the message is one line."""


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Any, before_rename: Any = None) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync, then rename.

    A crash leaves either the old file or the new one, never a truncated file.
    ``before_rename(tmp_path)`` runs once the new file is complete, before it replaces the old.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def recorded_hashes(path: Path) -> set[str] | None:
    """The sha256 values the stage folder's manifest accepts for a checkpoint, if it has one.

    Both the new hash and the one it replaces are accepted: a crash between recording and
    renaming leaves the previous file, which is still good.
    """
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        entry = json.loads(manifest.read_text()).get("checkpoints", {}).get(path.stem)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or "sha256" not in entry:
        return None
    return {entry["sha256"], entry.get("previous_sha256")} - {None}


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
            f"{path.parent / 'manifest.json'}: it changed after it was written"
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


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "") -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights."""
    try:
        model = build_model(**ckpt["model"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        name = ckpt.get("model", {}).get("name", "?")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(
            f"the weights in '{path}' do not fit a {name} model as described ({reason})"
        ) from None
    return model


def resolve_run(out_dir: str | Path, run: str | None, new: bool) -> tuple[str, bool]:
    """Return (run name, inferred?). Without a name: a new timestamped run, or the latest one."""
    out_dir = Path(out_dir)
    if run is not None:
        return run, False
    if new:
        return time.strftime(RUN_NAME_FORMAT), True
    latest = out_dir / LATEST
    if latest.is_file() and (out_dir / latest.read_text().strip()).is_dir():
        return latest.read_text().strip(), True
    raise CheckpointError(
        f"no run given and no earlier run in '{out_dir}'; start one with "
        "`distill-cli pretrain run=NAME` or pass run=NAME"
    )


def mark_latest(out_dir: str | Path, run: str) -> None:
    """Remember ``run`` as the most recent run, for stages started without ``run=``."""
    atomic_write(Path(out_dir) / LATEST, lambda f: f.write(run.encode()))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a stage folder."""
    path = Path(path)
    if path.is_file():
        return path
    for name in ("best.pt", "last.pt"):
        if (path / name).is_file():
            return path / name
    if path.is_dir():
        raise CheckpointError(f"'{path}' holds no checkpoint (best.pt or last.pt)")
    raise CheckpointError(f"'{path}' does not exist")


def stage_input(run_dir: Path, stage: str, from_path: str | None) -> Path:
    """The checkpoint a stage reads: ``stage.from`` if given, else its upstream stage's folder."""
    if from_path is not None:
        return find_checkpoint(from_path)
    upstream = UPSTREAM[stage]
    try:
        return find_checkpoint(run_dir / upstream)
    except CheckpointError:
        raise CheckpointError(
            f"{stage} needs a {upstream} checkpoint and '{run_dir / upstream}' has none: run "
            f"`distill-cli {upstream} run={run_dir.name} ...` first, or pass stage.from=PATH"
        ) from None


def has_results(folder: Path) -> bool:
    """True when a stage folder already holds checkpoints or final metrics."""
    return any((folder / name).exists() for name in ("best.pt", "last.pt", "metrics.json"))


def move_aside(folder: Path, run_dir: Path) -> Path:
    """Move an existing stage folder into ``<run>/.replaced/`` so nothing is lost."""
    rel = folder.relative_to(run_dir).as_posix().replace("/", "__")
    target = run_dir / REPLACED / f"{rel}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder), str(target))
    return target


def stage_folders(run_dir: Path) -> list[Path]:
    """Every folder in a run that holds a checkpoint, skipping hidden folders; oldest first."""
    found = []
    for ckpt in run_dir.rglob("*.pt"):
        rel = ckpt.relative_to(run_dir).parts
        if ckpt.name in ("best.pt", "last.pt") and not any(p.startswith(".") for p in rel):
            found.append(ckpt.parent)

    def started(folder: Path) -> float:  # config.yaml is written once, when the stage starts
        marker = folder / "config.yaml"
        return (marker if marker.exists() else folder).stat().st_mtime

    return sorted(set(found), key=lambda p: (started(p), str(p)))
