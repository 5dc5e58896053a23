"""Metrics against answers computed by hand."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from distill_cli.evaluation.metrics import (
    agreement,
    classification_metrics,
    collect_logits,
    compression_metrics,
    kept_accuracy,
    ratios,
)

FAST = {"latency_runs": 3, "throughput_batch": 4, "throughput_runs": 2, "warmup": 1}


def confident(p: float, classes: int = 2) -> list[float]:
    """Logits whose softmax gives class 0 probability p and splits the rest evenly."""
    return [math.log(p * (classes - 1) / (1 - p))] + [0.0] * (classes - 1)


def test_constant_model_accuracy_nll_and_ece():
    # always class 0 with confidence 0.8 = 8 / (8 + 1 + 1); half the labels are class 0
    logits = torch.tensor([confident(0.8, classes=3)] * 4)
    scores = classification_metrics(logits, torch.tensor([0, 0, 1, 2]))
    assert scores["n"] == 4
    assert scores["top1"] == pytest.approx(50)
    assert scores["top5"] == pytest.approx(100)  # top-min(5, 3) with 3 classes
    assert scores["nll"] == pytest.approx(-(2 * math.log(0.8) + 2 * math.log(0.1)) / 4, rel=1e-5)
    assert scores["ece"] == pytest.approx(100 * abs(0.5 - 0.8), abs=1e-4)


def test_ece_weighs_bins_by_size():
    # bin (14/15, 1]: two right at 0.95 -> gap 0.05; bin (10/15, 11/15]: two wrong at 0.7 -> 0.7
    logits = torch.tensor([confident(0.95)] * 2 + [confident(0.7)] * 2)
    scores = classification_metrics(logits, torch.tensor([0, 0, 1, 1]))
    assert scores["ece"] == pytest.approx(100 * (0.5 * 0.05 + 0.5 * 0.7), abs=1e-4)


def test_ece_pools_samples_within_a_bin():
    # 0.85 right and 0.81 wrong share bin (12/15, 13/15]: |0.5 - 0.83|, not the mean of 0.15, 0.81
    logits = torch.tensor([confident(0.85), confident(0.81)])
    scores = classification_metrics(logits, torch.tensor([0, 1]))
    assert scores["ece"] == pytest.approx(33, abs=1e-4)


def test_perfectly_calibrated_ece_is_zero():
    # confidence 0.75 and three of four right
    logits = torch.tensor([confident(0.75)] * 4)
    scores = classification_metrics(logits, torch.tensor([0, 0, 0, 1]))
    assert scores["top1"] == pytest.approx(75)
    assert scores["ece"] == pytest.approx(0, abs=1e-4)


def test_top5_counts_a_label_in_the_top_five():
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]] * 2)
    scores = classification_metrics(logits, torch.tensor([4, 5]))
    assert scores["top1"] == 0 and scores["top5"] == pytest.approx(50)


def test_no_samples_gives_nan():
    scores = classification_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    assert scores["n"] == 0 and math.isnan(scores["top1"]) and math.isnan(scores["ece"])


def test_agreement():
    logits = torch.randn(8, 5)
    assert agreement(logits, logits) == pytest.approx(100)
    teacher = torch.eye(3)[[0, 1, 2, 0]]
    student = torch.eye(3)[[0, 1, 2, 2]]
    assert agreement(student, teacher) == pytest.approx(75)
    with pytest.raises(ValueError, match="shapes differ"):
        agreement(torch.zeros(4, 3), torch.zeros(4, 2))


def test_collect_logits_shapes_mode_and_amp_factory():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    model[1].eval()  # a submodule in its own mode must keep it
    batches = [(torch.randn(b, 4), torch.randint(0, 3, (b,))) for b in (2, 3, 1)]
    entered = []

    def amp():
        entered.append(1)
        return contextlib.nullcontext()

    logits, labels = collect_logits(model, batches, amp=amp)
    assert logits.shape == (6, 3) and logits.dtype == torch.float32 and not logits.requires_grad
    assert torch.equal(labels, torch.cat([y for _, y in batches]))
    assert len(entered) == 3
    assert model.training and not model[1].training
    # a context manager instance works too, and so does none
    assert collect_logits(model, batches, amp=contextlib.nullcontext())[0].shape == (6, 3)
    assert collect_logits(model, [])[0].numel() == 0


def test_compression_metrics_linear():
    # Linear(4 -> 3) on one flattened 1x2x2 image: 4 * 3 = 12 multiply-adds = 24 FLOPs
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    m = compression_metrics(model, (1, 2, 2), **FAST)
    assert m["params"] == 12
    assert m["flops"] == 24 and m["macs"] == 12
    assert m["size_mb"] == pytest.approx(12 * 4 / 2**20)
    assert 0 < m["latency_ms_p50"] <= m["latency_ms_p95"]
    assert m["throughput"] > 0


def test_compression_metrics_conv_and_checkpoint_size(tmp_path):
    # 2 output channels x 16 positions x 9 taps (padding taps counted too) = 288 MACs
    model = nn.Conv2d(1, 2, 3, padding=1)
    checkpoint = tmp_path / "conv.pt"
    torch.save(model.state_dict(), checkpoint)
    m = compression_metrics(model, (1, 4, 4), checkpoint=checkpoint, **FAST)
    assert m["macs"] == 288 and m["flops"] == 576
    assert m["params"] == 2 * 9 + 2
    assert m["size_mb"] == pytest.approx(checkpoint.stat().st_size / 2**20)


def test_compression_metrics_counts_buffers_and_measures_in_eval_mode():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3, bias=False)).train()
    m = compression_metrics(model, (1, 2, 2), **FAST)
    # BatchNorm: 8 parameters + running mean, running var (4 each) + num_batches_tracked
    assert m["params"] == 8 + 12
    assert m["size_mb"] == pytest.approx((8 + 12 + 9) * 4 / 2**20)
    assert torch.equal(model[1].running_mean, torch.zeros(4))  # eval mode: stats untouched
    assert model.training


def test_ratios():
    student = {"params": 10, "size_mb": 1.0, "macs": 50, "throughput": 200.0, "top1": 1}
    teacher = {"params": 100, "size_mb": 4.0, "macs": 0, "latency_ms_p50": 2.0, "throughput": 100}
    r = ratios(student, teacher)
    assert set(r) == {"params_ratio", "size_mb_ratio", "macs_ratio", "throughput_ratio"}
    assert r["params_ratio"] == pytest.approx(0.1)
    assert r["size_mb_ratio"] == pytest.approx(0.25)
    assert r["throughput_ratio"] == pytest.approx(2.0)
    assert math.isnan(r["macs_ratio"])  # a zero teacher value has no ratio
    assert ratios(student, teacher, keys=("top1",)) == {}


def test_kept_accuracy():
    assert kept_accuracy(45.0, 90.0) == pytest.approx(50)
    assert kept_accuracy(99.0, 90.0) == pytest.approx(110)
    assert math.isnan(kept_accuracy(10.0, 0.0))
