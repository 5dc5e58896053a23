"""Where and how a stage runs: device, seeding, autocast, logging and the manifest.

``distill-cli pretrain device=cuda device.amp=true`` and ``device.deterministic=true`` land here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from distill_cli.checkpoint import atomic_write

log = logging.getLogger("distill_cli")


class DeviceError(Exception):
    """A device that cannot be used here; the message is one line."""


class FolderLocked(Exception):
    """Another process is writing the stage folder; the message is one line."""


LOCK_FILE = ".lock"
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


class StopRequest:
    """Turns SIGINT and SIGTERM into a flag the training loop checks between steps.

    A step is never cut in half, so the state saved on stopping resumes exactly. A second
    Ctrl-C stops at once.
    """

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def setup_torch(seed: int, deterministic: bool, threads: int | None) -> None:
    """Seed every generator; optionally force deterministic kernels and set the thread count."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# What ``device.amp: null`` means on each device, as measured by bench/cpu_formats.py
# (docs/performance.md): on a CPU with AVX-512 BF16 but no AMX, bf16 autocast trained no faster
# than fp32, and slower with channels-last, so the CPU keeps fp32 unless asked.
AMP_BY_DEFAULT = {"cuda": True, "cpu": False}


def amp_enabled(device: torch.device, amp: bool | None) -> bool:
    """Whether autocast runs: ``device.amp`` when set, else the measured default for the device."""
    if device.type not in AMP_BY_DEFAULT:
        return False
    return AMP_BY_DEFAULT[device.type] if amp is None else amp


def autocast(
    device: torch.device, enabled: bool | None, dtype: str
) -> contextlib.AbstractContextManager:
    """Mixed precision: ``dtype`` on CUDA, bfloat16 on the CPU; a no-op when off or elsewhere.

    Raises:
        DeviceError: float16 asked for on the CPU, where it has no gradient scaler and no speed.
    """
    if not amp_enabled(device, enabled):
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype != "bfloat16":
        raise DeviceError(
            f"device.amp_dtype={dtype} runs only on CUDA; on the CPU use device.amp_dtype=bfloat16 "
            "or device.amp=false"
        )
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def setup_logging(log_file: Path | None, console_handler: logging.Handler) -> None:
    """Send the package's log records to the console and, when given, to a file."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(console_handler)
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def close_logging() -> None:
    """Close file handlers so the log is complete on disk."""
    for handler in list(log.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            log.removeHandler(handler)


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
    import hydra
    import omegaconf
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
    }


def json_bytes(data: Any, sort_keys: bool = True) -> bytes:
    """``data`` as the indented JSON text :func:`write_json` writes."""
    return (json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n").encode()


def write_json(path: Path, data: Any, sort_keys: bool = True) -> None:
    """Write JSON atomically, indented."""
    blob = json_bytes(data, sort_keys)
    atomic_write(path, lambda f: f.write(blob))


def now() -> str:
    """The local time as an ISO 8601 string with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_manifest(stage: str, tag: str, run: str, seed: int, device: torch.device) -> dict:
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
