"""Distillation losses: small pure functions on logits, chosen by name with ``kd=NAME``.

``distill-cli distill kd=kd kd.temperature=4`` uses :func:`kd_loss`; ``kd=logit_mse`` uses
:func:`logit_mse`. :func:`distill_loss` weighs a method against the label cross-entropy and
returns every term, so each can be logged on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


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


# name -> function(student_logits, teacher_logits, **method options)
KD_METHODS: dict[str, Callable[..., torch.Tensor]] = {"kd": kd_loss, "logit_mse": logit_mse}


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    ce_weight: float,
    kd_weight: float,
    **options: float,
) -> dict[str, torch.Tensor]:
    """Weighted sum of the label cross-entropy and a distillation term.

    Returns:
        ``{"loss": total, "ce": unweighted cross-entropy, "kd": unweighted distillation term}``.
    """
    if method not in KD_METHODS:
        raise ValueError(f"unknown kd method '{method}'; valid: {', '.join(KD_METHODS)}")
    ce = F.cross_entropy(student.float(), labels)
    kd = KD_METHODS[method](student, teacher, **options)
    return {"loss": ce_weight * ce + kd_weight * kd, "ce": ce, "kd": kd}
