"""Shared fixtures: configs composed with Hydra's compose API, tiny settings, real-data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from distill_cli.cli import conf_dir

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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
