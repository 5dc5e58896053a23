"""Distillation losses on logits: small pure functions, chosen by name with ``kd=NAME``.

``distill-cli distill kd=kd kd.temperature=4`` uses :func:`kd_loss`; ``kd=logit_mse``,
``kd=dkd``, ``kd=dist``, ``kd=ttm`` and ``kd=wttm`` use :func:`logit_mse`, :func:`dkd_loss`,
:func:`dist_loss`, :func:`ttm_loss` and :func:`wttm_loss`; ``kd=ctkd`` is :func:`kd_loss` at the
learned temperature of ``temperature.CurriculumTemperature``. :func:`distill_loss` weighs a
method against the label cross-entropy and returns every term, so each can be logged on its
own; with ``kd.logit_standardize=true`` it z-scores both logits first (:func:`standardize`).
Feature methods (FitNet, AT, SP, RKD, PKT, CRD) live in ``features``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

UNLABELLED = -1  # label of a sample without a ground-truth class


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015: KL(teacher_T || student_T) averaged over the batch, times T squared.

    ``batchmean`` divides by the batch size only; plain ``mean`` would also divide by the class
    count. The T squared factor keeps gradient magnitudes comparable across temperatures.
    """
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def logit_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and classes of the squared difference between logits."""
    return F.mse_loss(student.float(), teacher.float())


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``, each times T squared.

    TCKD is the KL between the binary (target, all others) distributions; NCKD the KL between
    the distributions over the non-target classes. Both are batchmean, as in mdistiller's DKD,
    whose NCKD hides the target class by subtracting 1000 from its tempered logit. Computed in
    log space, so a saturated softmax gives no ``log(0)``. The warm-up is the caller's business.
    """
    target = F.one_hot(labels, student.shape[1]).bool()
    log_s = F.log_softmax(student.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:  # log of (p_target, 1 - p_target)
        in_target = log_p.masked_fill(~target, float("-inf")).logsumexp(1)
        others = log_p.masked_fill(target, float("-inf")).logsumexp(1)
        return torch.stack([in_target, others], dim=1)

    tckd = F.kl_div(binary(log_s), binary(log_t), reduction="batchmean", log_target=True)
    hide = 1000.0 * target  # mdistiller's mask: exp(-1000) is 0 in float32
    log_s_rest = F.log_softmax(student.float() / temperature - hide, dim=1)
    log_t_rest = F.log_softmax(teacher.float() / temperature - hide, dim=1)
    nckd = F.kl_div(log_s_rest, log_t_rest, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * temperature**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; eps as in DIST."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): match correlations instead of exact probabilities.

    Inter-class relation: 1 - Pearson correlation between a sample's student and teacher
    probabilities, averaged over the batch. Intra-class relation: the same along the batch for
    each class, averaged over classes. Both times T squared. The defaults (T=1, weights 1) are
    those of the official code (hunto/DIST_KD, ImageNet); its CIFAR-100 recipe uses T=4.
    """
    p_student = F.softmax(student.float() / temperature, dim=1)
    p_teacher = F.softmax(teacher.float() / temperature, dim=1)
    inter = 1 - _pearson_rows(p_student, p_teacher).mean()
    intra = 1 - _pearson_rows(p_student.T, p_teacher.T).mean()
    return (inter_weight * inter + intra_weight * intra) * temperature**2


def ttm_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 10.0
) -> torch.Tensor:
    """Transformed teacher matching (Zheng & Yang, ICLR 2024): KL(p_t^(1/T) || p_s), batchmean.

    The teacher's distribution is power-transformed with ``gamma = 1/T`` and renormalised,
    which is ``softmax(z_t / T)``; the student's is its plain softmax (no temperature, no T
    squared factor), as in the authors' ``distiller_zoo/ttm.py``.
    """
    log_p_student = F.log_softmax(student.float(), dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def wttm_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 10.0
) -> torch.Tensor:
    """Weighted TTM (Zheng & Yang, ICLR 2024): each sample's TTM term times ``sum_c p_t,c^(1/T)``.

    The weight is the power sum of the teacher's distribution, ``exp((1 - g) H_g(p_t))`` with
    ``H_g`` its Renyi entropy of order ``g = 1/T``: larger for smoother teacher outputs.
    Averaged over the batch, as the authors' ``distiller_zoo/wttm.py``.
    """
    log_p_student = F.log_softmax(student.float(), dim=1)
    log_p = F.log_softmax(teacher.float(), dim=1)
    log_p_teacher = F.log_softmax(log_p / temperature, dim=1)  # = teacher / T, renormalised
    per_sample = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1)
    weight = (log_p / temperature).logsumexp(1).exp()  # sum_c p_c^(1/T)
    return (weight * per_sample).mean()


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024): each row's z-score, ``(z - mean) / std``.

    ``std`` is the sample standard deviation (``ddof=1``) plus ``eps``, as the authors' code.
    """
    logits = logits.float()
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + eps)


# name -> function(student_logits, teacher_logits, labels, **method options)
LOGIT_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "kd": lambda student, teacher, labels, **options: kd_loss(student, teacher, **options),
    "logit_mse": lambda student, teacher, labels, **options: logit_mse(student, teacher, **options),
    "dkd": dkd_loss,
    "dist": lambda student, teacher, labels, **options: dist_loss(student, teacher, **options),
    "ttm": lambda student, teacher, labels, **options: ttm_loss(student, teacher, **options),
    "wttm": lambda student, teacher, labels, **options: wttm_loss(student, teacher, **options),
    # Hinton KD at a temperature the objective learns (``temperature.CurriculumTemperature``)
    "ctkd": lambda student, teacher, labels, **options: kd_loss(student, teacher, **options),
}
KD_METHODS = LOGIT_METHODS  # the name older callers import
# The methods whose logits ``kd.logit_standardize`` may z-score. TTM and WTTM match the
# student's untempered distribution to the teacher's at temperature T: with both z-scored the
# student's logits would have spread 1 and the teacher's 1/T, a target it could never reach.
STANDARDIZED = ("kd", "logit_mse", "dkd", "dist", "ctkd")


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled samples; labels of ``UNLABELLED`` are skipped.

    With no labelled sample it is a zero that still depends on ``logits``, so ``backward`` works.
    Needs no host-device synchronisation.
    """
    labelled = labels != UNLABELLED
    per_sample = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    return (per_sample * labelled).sum() / labelled.sum().clamp(min=1)


def mixed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of mixed images against both of their labels (mixup's label term).

    Image ``i`` is ``lam[i]`` itself and ``1 - lam[i]`` its ``partner[i]``: its loss is
    ``lam * CE(y_i) + (1 - lam) * CE(y_partner)``, each side counted only where that image has a
    label. The sum is divided by the labelled weight, so unmixed images (``lam = 1``) give
    :func:`masked_cross_entropy`.
    """
    logits = logits.float()
    own = lam.float() * (labels != UNLABELLED)
    other = (1 - lam.float()) * (labels[partner] != UNLABELLED)
    ce_own = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    ce_other = F.cross_entropy(logits, labels[partner].clamp(min=0), reduction="none")
    weight = (own + other).sum().clamp(min=1e-12)
    return (own * ce_own + other * ce_other).sum() / weight


def check_logit_method(method: str, logit_standardize: bool = False) -> None:
    """Raises ValueError for an unknown method or a standardization it does not take."""
    if method not in LOGIT_METHODS:
        raise ValueError(f"unknown kd method '{method}'; valid: {', '.join(LOGIT_METHODS)}")
    if logit_standardize and method not in STANDARDIZED:
        raise ValueError(
            f"kd.logit_standardize=true does not apply to kd={method}; methods it applies to: "
            f"{', '.join(STANDARDIZED)}"
        )


def logit_term(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    logit_standardize: bool = False,
    **options: float | torch.Tensor,
) -> torch.Tensor:
    """The unweighted distillation term of a logit method.

    Labels of -1 mark samples without a class: DKD takes the teacher's top class as their
    target. With ``logit_standardize`` both models' logits are z-scored first
    (:func:`standardize`). Names are checked where the term is built
    (:func:`check_logit_method`), not at every step.
    """
    targets = torch.where(labels == UNLABELLED, teacher.argmax(1), labels)
    if logit_standardize:
        student, teacher = standardize(student), standardize(teacher)
    return LOGIT_METHODS[method](student, teacher, targets, **options)


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    ce_weight: float,
    kd_weight: float,
    logit_standardize: bool = False,
    **options: float | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Weighted sum of the label cross-entropy and a logit distillation term.

    Labels of -1 mark unlabelled samples: they are left out of the cross-entropy but still
    distilled (:func:`logit_term`); the cross-entropy always reads the student's own logits.

    Returns:
        ``{"loss": total, "ce": unweighted cross-entropy, "kd": unweighted distillation term}``.
    """
    check_logit_method(method, logit_standardize)
    ce = masked_cross_entropy(student, labels)
    kd = logit_term(student, teacher, labels, method, logit_standardize, **options)
    return {"loss": ce_weight * ce + kd_weight * kd, "ce": ce, "kd": kd}
