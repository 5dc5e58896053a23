"""Autocast and layout on the CPU: bf16 only when asked, channels-last by default (measured)."""

import pytest
import torch

from distill_cli import runtime
from distill_cli.config import check
from distill_cli.stagefolder import Stage
from distill_cli.stages import _channels_last, run_stage
from tests.conftest import TINY

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_amp_null_means_the_measured_default_for_each_device():
    assert runtime.amp_enabled(CUDA, None) and not runtime.amp_enabled(CPU, None)
    assert runtime.amp_enabled(CPU, True) and not runtime.amp_enabled(CUDA, False)
    assert not runtime.amp_enabled(torch.device("meta"), True)


def test_cpu_autocast_runs_in_bfloat16_only_when_asked():
    a = torch.randn(4, 4)
    with runtime.autocast(CPU, True, "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16
    with runtime.autocast(CPU, None, "bfloat16"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(runtime.DeviceError, match="amp_dtype=float16 runs only on CUDA"):
        runtime.autocast(CPU, True, "float16")


def test_default_config_trains_channels_last_in_fp32_on_the_cpu(make_cfg):
    cfg = make_cfg("device=cpu")
    assert cfg.device.amp is None and cfg.device.channels_last and cfg.device.threads is None
    st = Stage(cfg, run_dir=None, folder=None, device=CPU)
    assert _channels_last(st) and not runtime.amp_enabled(CPU, cfg.device.amp)


def test_pretrain_with_bf16_autocast_on_the_cpu(make_cfg, tmp_path):
    cfg = make_cfg("stage=pretrain", "run=bf16", "device=cpu", "device.amp=true", *TINY)
    check(cfg)
    run_stage(cfg)
    log = (tmp_path / "outputs" / "bf16" / "pretrain" / "stage.log").read_text()
    assert "epoch 2: loss" in log
