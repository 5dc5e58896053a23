"""Shared fixtures: configs composed with Hydra's compose API, tiny settings, real-data paths."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distill_cli.cli import conf_dir

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config) -> None:
    """Under pytest-xdist, share the cores out: each worker's PyTorch gets cores / workers threads.

    Every worker would otherwise start one thread per core, and so would the CLI processes the
    tests start: 16 workers on a 16-core GPU machine ran 256 threads, and stages that take a
    second alone hit the 60 s test timeout (docs/performance.md, "The suite on CUDA").
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the tests' child processes inherit it
        os.environ.setdefault(name, threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Small enough that a stage runs in about a second on 2 CPU cores.
TINY = ["model=cnn", "stage.epochs=2", "stage.batch_size=32", "dataset.fraction=0.05"]


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the config like the CLI does, with out_dir in a temporary folder."""

    def make(*overrides: str):
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            return compose("config", overrides=[f"out_dir={tmp_path / 'outputs'}", *overrides])

    return make


@pytest.fixture
def shared_data() -> Path:
    """Real MNIST and USPS from ../shared/data; skip when this checkout has none."""
    if not (SHARED_DATA / "MNIST").is_dir():
        pytest.skip(f"real datasets not present at {SHARED_DATA}")
    return SHARED_DATA


def signal_mid_epoch_2(proc: subprocess.Popen, folder: Path, sig: int) -> None:
    """Wait until ``proc`` has written epoch 1's row in ``folder``, then send ``sig`` to it
    half an epoch later: in the middle of epoch 2."""
    metrics = folder / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.01)
    epoch_time = json.loads(metrics.read_text().splitlines()[0])["epoch_time_s"]
    time.sleep(epoch_time / 2)
    proc.send_signal(sig)
