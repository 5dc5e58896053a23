"""Distillation losses against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill_cli.losses import distill_loss, kd_loss, logit_mse


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
    y = torch.randint(0, 6, (4,))
    for method, opts in (("kd", {"temperature": 3.0}), ("logit_mse", {})):
        student.grad = None
        with torch.no_grad():  # how the distill stage calls the teacher
            t = teacher * 1.0
        distill_loss(student, t, y, method, 1.0, 1.0, **opts)["loss"].backward()
        assert student.grad is not None and student.grad.abs().sum() > 0
        assert teacher.grad is None


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="unknown kd method 'nope'; valid: kd, logit_mse"):
        distill_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "nope", 1, 1
        )
