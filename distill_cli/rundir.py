"""The run directory, its one owner: atomic files, runs, stage folders, locks and manifests.

    distill-cli pretrain run=demo        # outputs/demo/pretrain/{manifest.json,best.pt,...}
    distill-cli finetune                 # no run=: the run named in outputs/.latest
    distill-cli eval run=demo            # every stage folder of outputs/demo/

A run is ``<out_dir>/<run>/``; each stage writes ``<run>/<tag>/`` holding its checkpoints,
``config.yaml``, ``metrics.json`` and ``manifest.json`` (what ran, where, from which parent).
Overwritten stage folders move into ``<run>/.replaced/``. Nothing here imports torch: the report,
the aggregation and the data cache use it without loading a model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from distill_cli.config import RUN_NAME_FORMAT

LATEST = ".latest"  # file in out_dir naming the most recently used run
REPLACED = ".replaced"  # folder in a run where overwritten stage folders are moved
LOCK_FILE = ".lock"
MANIFEST = "manifest.json"
# Which stage feeds which, and the command that makes it (for the "run this first" message).
UPSTREAM = {"finetune": "pretrain", "distill": "finetune"}


class CheckpointError(Exception):
    """A checkpoint or run folder that cannot be used; the message is one line."""


class FolderLocked(Exception):
    """Another process is writing the stage folder; the message is one line."""


# --- files: hashes, atomic writes, JSON ---------------------------------------------------------


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(
    path: Path, write: Callable[[BinaryIO], Any], before_rename: Callable[[Path], Any] | None = None
) -> None:
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


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically, its newlines as given."""
    blob = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(blob))


def json_bytes(data: Any, sort_keys: bool = True) -> bytes:
    """``data`` as the indented JSON text :func:`write_json` writes."""
    return (json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n").encode()


def write_json(path: Path, data: Any, sort_keys: bool = True) -> None:
    """Write JSON atomically, indented."""
    blob = json_bytes(data, sort_keys)
    atomic_write(path, lambda f: f.write(blob))


def read_json(path: Path) -> Any:
    """The JSON a file holds, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def flatten(tree: Any, prefix: str = "", skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{"kd": {"temperature": 4}}`` -> ``{"kd.temperature": 4}``; lists stay values.

    Keys in ``skip`` are left out at every depth.
    """
    skip = frozenset(skip)
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key not in skip:
            flat.update(flatten(value, f"{prefix}{key}.", skip))
    return flat


def now() -> str:
    """The local time as an ISO 8601 string with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- runs and stage folders ---------------------------------------------------------------------


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


# --- locks ----------------------------------------------------------------------------------------

_locks: dict[Path, int] = {}  # folder -> open file descriptor holding its lock


def lock_folder(folder: Path) -> None:
    """Take the stage folder's lock, or raise FolderLocked naming the process that holds it.

    The kernel releases an flock when its owner dies, however it dies, so a lock never outlives
    its process; the file itself only records the owner's pid.
    """
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderLocked(
            f"'{folder}' is being written by another distill-cli process (pid {owner}); wait for "
            "it to finish, or write elsewhere with tag=NEW_TAG"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _locks[folder.resolve()] = fd


def check_unlocked(folder: Path) -> None:
    """Raise FolderLocked if another process holds the folder's lock; take nothing."""
    if (folder / LOCK_FILE).exists() and folder.resolve() not in _locks:
        lock_folder(folder)
        unlock_folder(folder)


def unlock_folder(folder: Path) -> None:
    """Release the folder's lock and remove the lock file."""
    fd = _locks.pop(folder.resolve(), None)
    if fd is not None:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)


# --- the manifest ---------------------------------------------------------------------------------


def manifest_path(folder: Path) -> Path:
    """Where a stage folder's manifest lives."""
    return folder / MANIFEST


def read_manifest(folder: Path) -> dict | None:
    """A stage folder's manifest, or None when it has none or it cannot be read."""
    manifest = read_json(manifest_path(folder))
    return manifest if isinstance(manifest, dict) else None


def write_manifest(folder: Path, manifest: dict) -> None:
    """Persist a stage folder's manifest atomically."""
    write_json(manifest_path(folder), manifest)


def parent_path(folder: Path) -> str | None:
    """The checkpoint a stage folder was built from (its manifest's ``parent.path``), if any."""
    manifest = read_manifest(folder) if manifest_path(folder).is_file() else None
    return ((manifest or {}).get("parent") or {}).get("path")


def recorded_hashes(path: Path) -> set[str] | None:
    """The sha256 values the stage folder's manifest accepts for a checkpoint, if it has one.

    Both the new hash and the one it replaces are accepted: a crash between recording and
    renaming leaves the previous file, which is still good.
    """
    manifest = read_manifest(path.parent)
    if manifest is None:
        return None
    entry = manifest.get("checkpoints", {}).get(path.stem)
    if not isinstance(entry, dict) or "sha256" not in entry:
        return None
    return {entry["sha256"], entry.get("previous_sha256")} - {None}


def new_manifest(stage: str, tag: str, run: str, seed: int, device: str) -> dict:
    """The manifest's fields known when a stage starts; the stage fills in the rest."""
    return {
        "stage": stage,
        "tag": tag,
        "run": run,
        "seed": seed,
        "status": "running",
        "started": now(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "device": str(device),
        "git": git_commit(),
        "versions": versions(),
        "parent": None,
        "data": None,
        "checkpoints": {},
    }


def git_commit() -> dict[str, Any]:
    """The commit of the distill-cli source tree, and whether it has uncommitted changes."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    # Imported here: the manifest is written by stages, which have loaded torch already.
    import hydra
    import omegaconf
    import torch
    import torchvision

    from distill_cli import __version__

    return {
        "distill_cli": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "hydra": hydra.__version__,
        "omegaconf": omegaconf.__version__,
        "platform": platform.platform(),
        # timm only where a timm model was built (imported lazily: it is slow to import)
        **({"timm": sys.modules["timm"].__version__} if "timm" in sys.modules else {}),
    }
