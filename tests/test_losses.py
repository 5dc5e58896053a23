"""Distillation losses against values computed by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_cli.kd.losses import (
    KD_METHODS,
    LOGIT_METHODS,
    dist_loss,
    distill_loss,
    dkd_loss,
    kd_loss,
    logit_mse,
)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _softmax(z, t):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_hand_computation():
    s, t = [1.0, 2.0, 0.5], [0.3, 2.5, 1.0]
    s2, t2 = [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]
    temp = 2.0
    expected = (
        _kl(_softmax(t, temp), _softmax(s, temp)) + _kl(_softmax(t2, temp), _softmax(s2, temp))
    ) / 2
    got = kd_loss(torch.tensor([s, s2]), torch.tensor([t, t2]), temperature=temp)
    assert got.item() == pytest.approx(expected * temp**2, rel=1e-5)


def test_kd_loss_is_batchmean_not_mean_over_classes():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    per_sample = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1), reduction="sum") / 4
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(per_sample.item(), rel=1e-5)


def test_kd_loss_zero_when_student_equals_teacher():
    z = torch.randn(3, 5)
    assert kd_loss(z, z.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_temperature_squared_scaling():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    p_t, p_s = _softmax([0.0, 2.0], 4.0), _softmax([2.0, 0.0], 4.0)
    assert kd_loss(s, t, temperature=4.0).item() == pytest.approx(16 * _kl(p_t, p_s), rel=1e-5)


def test_logit_mse_by_hand():
    s, t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    assert logit_mse(s, t).item() == pytest.approx((1 + 4 + 1 + 9) / 4)


def test_distill_loss_weights_and_parts():
    s = torch.tensor([[2.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([0])
    parts = distill_loss(s, t, y, "kd", ce_weight=0.25, kd_weight=2.0, temperature=1.0)
    ce = -math.log(_softmax([2.0, 0.0, 0.0], 1)[0])
    kd = _kl(_softmax([0.0, 1.0, 0.0], 1), _softmax([2.0, 0.0, 0.0], 1))
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kd"].item() == pytest.approx(kd, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.25 * ce + 2.0 * kd, rel=1e-5)


def test_gradients_reach_student_not_teacher():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    y = torch.tensor([0, -1, 5, 2])
    for method in LOGIT_METHODS:
        student.grad = None
        with torch.no_grad():  # how the distill stage calls the teacher
            t = teacher * 1.0
        parts = distill_loss(student, t, y, method, 0.0, 1.0)  # the distillation term alone
        parts["loss"].backward()
        assert student.grad is not None and student.grad.abs().sum() > 0, method
        assert teacher.grad is None, method


def test_unknown_method_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown kd method 'nope'; valid: kd, logit_mse, dkd, dist$"
    ):
        distill_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "nope", 1, 1
        )


def _dkd_by_hand(s, t, label, temp):
    p_s, p_t = _softmax(s, temp), _softmax(t, temp)
    tckd = _kl([p_t[label], 1 - p_t[label]], [p_s[label], 1 - p_s[label]])
    rest_s = [p / (1 - p_s[label]) for j, p in enumerate(p_s) if j != label]
    rest_t = [p / (1 - p_t[label]) for j, p in enumerate(p_t) if j != label]
    return tckd, _kl(rest_t, rest_s)


def test_dkd_matches_hand_computation():
    s, t = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.3, 2.5, 1.0], [1.0, 1.5, -0.5]]
    labels, temp, alpha, beta = [1, 2], 2.0, 0.5, 3.0
    parts = [_dkd_by_hand(si, ti, y, temp) for si, ti, y in zip(s, t, labels, strict=True)]
    tckd = sum(p[0] for p in parts) / 2
    nckd = sum(p[1] for p in parts) / 2
    expected = temp**2 * (alpha * tckd + beta * nckd)
    got = dkd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(labels), temp, alpha, beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dkd_zero_for_identical_logits_and_stable_when_saturated():
    z = torch.randn(4, 5) * 3
    y = torch.tensor([0, 1, 2, 4])
    assert dkd_loss(z, z.clone(), y).item() == pytest.approx(0.0, abs=1e-6)
    # a target probability of exactly 1 in float32 gives log(0) in the probability-space formula
    saturated = torch.tensor([[200.0, 0.0, 0.0]])
    loss = dkd_loss(saturated, torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([0]))
    assert torch.isfinite(loss)


def _pearson(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_dist_matches_numpy_pearson():
    s = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.2, 0.1, 0.0]])
    t = np.array([[0.3, 2.5, 1.0], [1.0, 1.5, -0.5], [2.0, 0.0, 0.0]])
    temp, w_inter, w_intra = 2.0, 0.5, 3.0
    p_s = np.exp(s / temp) / np.exp(s / temp).sum(1, keepdims=True)
    p_t = np.exp(t / temp) / np.exp(t / temp).sum(1, keepdims=True)
    inter = 1 - np.mean([_pearson(p_s[i], p_t[i]) for i in range(3)])
    intra = 1 - np.mean([_pearson(p_s[:, c], p_t[:, c]) for c in range(3)])
    expected = temp**2 * (w_inter * inter + w_intra * intra)
    got = dist_loss(torch.tensor(s), torch.tensor(t), temp, w_inter, w_intra)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dist_zero_for_identical_logits_only():
    torch.manual_seed(0)
    z = torch.randn(4, 5)
    # not exactly 0: the official eps=1e-8 in the correlation's denominator
    assert dist_loss(z, z.clone()).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(z, z.clone(), temperature=4.0).item() == pytest.approx(0.0, abs=1e-3)
    # a per-sample scale of the logits changes the probabilities, so the loss is not zero
    assert dist_loss(z * 2, z).item() > 1e-3


def test_logit_methods_share_one_signature():
    assert KD_METHODS is LOGIT_METHODS
    assert list(LOGIT_METHODS) == ["kd", "logit_mse", "dkd", "dist"]
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 3, 1])
    for name, fn in LOGIT_METHODS.items():
        assert fn(s, t, y).shape == (), name
    assert LOGIT_METHODS["kd"](s, t, y, temperature=2.0) == kd_loss(s, t, temperature=2.0)
    assert LOGIT_METHODS["dkd"](s, t, y, beta=2.0) == dkd_loss(s, t, y, beta=2.0)


def test_cross_entropy_skips_unlabelled_samples():
    s = torch.tensor([[2.0, 0.0, 0.0], [5.0, -5.0, 0.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, -1, 1])
    parts = distill_loss(s, s.clone(), y, "kd", ce_weight=1.0, kd_weight=1.0)
    ce0 = -math.log(_softmax([2.0, 0.0, 0.0], 1)[0])
    ce2 = -math.log(_softmax([0.0, 1.0, 3.0], 1)[1])
    assert parts["ce"].item() == pytest.approx((ce0 + ce2) / 2, rel=1e-5)


def test_all_unlabelled_gives_zero_cross_entropy_with_a_gradient_path():
    s = torch.randn(3, 4, requires_grad=True)
    parts = distill_loss(s, torch.randn(3, 4), torch.full((3,), -1), "kd", 1.0, 0.0)
    assert parts["ce"].item() == 0.0 and parts["ce"].requires_grad
    parts["loss"].backward()
    assert s.grad is not None and torch.all(s.grad == 0)


def test_dkd_targets_unlabelled_samples_with_the_teacher_top_class():
    s, t = torch.randn(3, 4), torch.tensor([[0.0, 3.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 2.0]])
    parts = distill_loss(s, t, torch.tensor([2, -1, -1]), "dkd", 1.0, 1.0, temperature=2.0)
    expected = dkd_loss(s, t, torch.tensor([2, 0, 3]), temperature=2.0)
    assert parts["kd"].item() == pytest.approx(expected.item(), rel=1e-6)
