"""Where and how a stage runs: device, seeding, autocast, stop signals and logging.

``distill-cli pretrain device=cuda device.amp=true`` and ``device.deterministic=true`` land here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("distill_cli")


class DeviceError(Exception):
    """A device that cannot be used here; the message is one line."""


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
