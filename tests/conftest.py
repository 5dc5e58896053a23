"""Shared fixtures: configs composed with Hydra's compose API, tiny settings, real-data paths."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distill_cli.cli import conf_dir

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
# Folders of the checkout the tests may leave changed: tool caches, the environment, and the
# user's own outputs/ and data/ (a demo running beside the suite writes there).
NOT_WATCHED = {".git", ".venv", ".pytest_cache", ".ruff_cache", "__pycache__", "outputs", "data",
               "build", ".distill_cache"}  # fmt: skip


def checkout_files(root: Path = REPO) -> set[str]:
    """Every file under ``root`` outside :data:`NOT_WATCHED` folders, relative to ``root``."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in NOT_WATCHED and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(folder, f), root) for f in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def _the_checkout_stays_clean():
    """No test leaves a file in the checkout (a stray ``glyph_bn.pid`` once got committed)."""
    before = checkout_files()
    yield
    new = sorted(checkout_files() - before)
    assert not new, f"the tests wrote {len(new)} file(s) into the checkout: {', '.join(new[:5])}"


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


def needs_extra(*modules: str, extra: str) -> pytest.MarkDecorator:
    """Skip, with the reason, where an optional extra is not installed (a bare GPU machine)."""

    def missing(module: str) -> bool:
        top = module.split(".")[0]
        return importlib.util.find_spec(top) is None or (
            "." in module and importlib.util.find_spec(module) is None
        )

    absent = [m for m in modules if missing(m)]
    return pytest.mark.skipif(
        bool(absent), reason=f"needs {', '.join(absent)}: pip install 'distill-cli[{extra}]'"
    )


ONNX = needs_extra("onnx", "onnxscript", "onnxruntime", extra="export")

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
