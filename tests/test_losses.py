"""Distillation losses against values computed by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_cli import config
from distill_cli.kd.losses import (
    KD_METHODS,
    LOGIT_METHODS,
    STANDARDIZED,
    dist_loss,
    distill_loss,
    dkd_loss,
    kd_loss,
    logit_mse,
    standardize,
    ttm_loss,
    wttm_loss,
)
from distill_cli.kd.temperature import (
    CurriculumTemperature,
    curriculum_strength,
    reverse_gradient,
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
        ValueError,
        match="unknown kd method 'nope'; valid: kd, logit_mse, dkd, dist, ttm, wttm, ctkd$",
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
    assert list(LOGIT_METHODS) == ["kd", "logit_mse", "dkd", "dist", "ttm", "wttm", "ctkd"]
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


# --- logit standardization (Sun et al., CVPR 2024) ----------------------------------------------


def _zscore(row):  # by hand: the sample standard deviation (n - 1), plus LSKD's 1e-7
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def test_standardize_is_the_per_sample_z_score():
    z = [[1.0, 2.0, 3.0, 6.0], [-2.0, 0.0, 0.0, 2.0]]
    # row 0: mean 3, std sqrt(14 / 3); row 1: mean 0, std sqrt(8 / 3)
    got = standardize(torch.tensor(z)).flatten().tolist()
    assert got == pytest.approx([v for r in z for v in _zscore(r)], rel=1e-6)
    assert _zscore(z[0])[3] == pytest.approx(3 / math.sqrt(14 / 3))


def test_logit_standardized_kd_by_hand_and_blind_to_scale_and_shift():
    s, t = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.3, 2.5, 1.0], [1.0, 1.5, -0.5]]
    temp = 2.0
    expected = (
        sum(
            _kl(_softmax(_zscore(ti), temp), _softmax(_zscore(si), temp))
            for si, ti in zip(s, t, strict=True)
        )
        / 2
        * temp**2
    )
    y = torch.tensor([0, 1])
    parts = distill_loss(torch.tensor(s), torch.tensor(t), y, "kd", 1.0, 1.0,
                         logit_standardize=True, temperature=temp)  # fmt: skip
    assert parts["kd"].item() == pytest.approx(expected, rel=1e-5)
    plain = distill_loss(torch.tensor(s), torch.tensor(t), y, "kd", 1.0, 1.0, temperature=temp)
    assert parts["ce"] == plain["ce"]  # the cross-entropy reads the raw logits
    # zero whenever the student's logits are a positive affine map of the teacher's, per sample
    teacher = torch.randn(4, 6)
    student = teacher * torch.tensor([[3.0], [0.5], [2.0], [10.0]]) + torch.randn(4, 1)
    for method in ("kd", "dkd", "logit_mse", "ctkd", "dist"):
        parts = distill_loss(student, teacher, torch.tensor([0, 1, 2, -1]), method, 0.0, 1.0,
                             logit_standardize=True)  # fmt: skip
        assert parts["kd"].item() == pytest.approx(0.0, abs=1e-4), method


def test_logit_standardized_mse_is_one_minus_the_logit_correlation():
    s = np.array([[1.0, 2.0, 0.5, 4.0], [0.0, -1.0, 3.0, 1.0]])
    t = np.array([[0.3, 2.5, 1.0, 0.0], [1.0, 1.5, -0.5, 2.0]])
    c = s.shape[1]  # z-scores with n - 1: |a - b|^2 = 2 (C - 1) (1 - r) over C classes
    expected = np.mean([2 * (c - 1) / c * (1 - _pearson(s[i], t[i])) for i in range(2)])
    parts = distill_loss(torch.tensor(s), torch.tensor(t), torch.tensor([0, 1]), "logit_mse",
                         1.0, 1.0, logit_standardize=True)  # fmt: skip
    assert parts["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_logit_standardize_is_refused_where_it_does_not_apply():
    assert set(STANDARDIZED) == set(config.STANDARDIZED)
    for method in set(LOGIT_METHODS) - set(STANDARDIZED):
        with pytest.raises(ValueError) as err:
            distill_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]), method, 1, 1,
                         logit_standardize=True)  # fmt: skip
        assert str(err.value) == (
            f"kd.logit_standardize=true does not apply to kd={method}; methods it applies to: "
            "kd, logit_mse, dkd, dist, ctkd"
        )


# --- TTM and WTTM (Zheng & Yang, ICLR 2024) -----------------------------------------------------


def _power_transform(p, gamma):  # p^gamma, renormalised: the paper's transformed teacher
    powered = [v**gamma for v in p]
    return [v / sum(powered) for v in powered]


def test_ttm_matches_hand_computation():
    s, t = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.3, 2.5, 1.0], [4.0, 1.5, -0.5]]
    temp = 4.0
    expected = (
        sum(
            _kl(_power_transform(_softmax(ti, 1), 1 / temp), _softmax(si, 1))
            for si, ti in zip(s, t, strict=True)
        )
        / 2
    )
    got = ttm_loss(torch.tensor(s), torch.tensor(t), temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the power transform is the tempered softmax: p^(1/T) renormalised = softmax(z / T)
    assert _power_transform(_softmax(t[1], 1), 1 / temp) == pytest.approx(_softmax(t[1], temp))


def test_wttm_weighs_each_sample_by_the_teachers_power_sum():
    s, t = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.3, 2.5, 1.0], [4.0, 1.5, -0.5]]
    temp = 4.0
    expected = 0.0
    for si, ti in zip(s, t, strict=True):
        p_t = _softmax(ti, 1)
        weight = sum(v ** (1 / temp) for v in p_t)
        expected += weight * _kl(_power_transform(p_t, 1 / temp), _softmax(si, 1)) / 2
    got = wttm_loss(torch.tensor(s), torch.tensor(t), temperature=temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # at T = 1 the weight is sum(p) = 1: WTTM is TTM is plain KL at T = 1
    z_s, z_t = torch.tensor(s), torch.tensor(t)
    assert wttm_loss(z_s, z_t, 1.0).item() == pytest.approx(ttm_loss(z_s, z_t, 1.0).item())
    assert ttm_loss(z_s, z_t, 1.0).item() == pytest.approx(kd_loss(z_s, z_t, 1.0).item())


def test_ttm_and_wttm_are_zero_where_the_student_matches_the_transformed_teacher():
    teacher = torch.randn(4, 7) * 3
    for loss in (ttm_loss, wttm_loss):
        assert loss(teacher / 5.0, teacher, temperature=5.0).item() == pytest.approx(0, abs=1e-6)
        assert loss(teacher.clone(), teacher, temperature=5.0).item() > 1e-3  # not at s = t


# --- CTKD (Li et al., AAAI 2023): the curriculum and the adversarial temperature -------------


def test_curriculum_strength_rises_along_a_cosine_then_holds():
    # CTKD's script: 0 -> 1 over 10 of 240 epochs; at epoch 1 its CosineDecay gives -0.02447
    assert curriculum_strength(0, 240, 10 / 240, 1.0) == 0.0
    assert curriculum_strength(1, 240, 10 / 240, 1.0) == pytest.approx(
        (1 - math.cos(math.pi / 10)) / 2
    )
    assert curriculum_strength(5, 240, 10 / 240, 1.0) == pytest.approx(0.5)
    assert curriculum_strength(10, 240, 10 / 240, 2.0) == pytest.approx(2.0)
    assert curriculum_strength(200, 240, 10 / 240, 1.0) == 1.0
    assert curriculum_strength(3, 100, 0.0, 0.7) == 0.7  # no curriculum: at once


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y, x)
    (3 * y).sum().backward()
    assert x.grad.tolist() == [-0.75, -0.75]


def test_ctkd_temperature_ascends_the_kd_loss_that_the_student_descends():
    torch.manual_seed(0)
    module = CurriculumTemperature(t_min=1.0, t_range=20.0)
    assert module(0.0).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))  # 15.62 at the start
    student, teacher = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5) * 3
    loss = kd_loss(student, teacher, module(0.5))
    loss.backward()
    # the same loss through a plain copy of theta: its gradient is the reversed one, times -1/0.5
    theta = module.theta.detach().clone().requires_grad_(True)
    plain = kd_loss(student.detach(), teacher, 1.0 + 20.0 * torch.sigmoid(theta))
    plain.backward()
    assert module.theta.grad.item() == pytest.approx(-0.5 * theta.grad.item(), rel=1e-5)
    assert theta.grad.item() != 0
    # a gradient step on theta raises the loss (adversarial); one on the student lowers it
    low = CurriculumTemperature(t_min=1.0, t_range=2.0)  # T near 2.5, where the loss is steep
    loss = kd_loss(student, teacher, low(1.0))
    student.grad = None
    loss.backward()
    with torch.no_grad():
        low.theta -= 0.5 * low.theta.grad
        stepped = student - 0.5 * student.grad
        assert kd_loss(student, teacher, low(1.0)).item() > loss.item() + 1e-4
        assert kd_loss(stepped, teacher, low(0.0)).item() < kd_loss(student, teacher, low(0.0))
