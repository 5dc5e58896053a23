"""CTKD's learnable temperature: ``distill-cli distill kd=ctkd``.

Curriculum Temperature for KD (Li et al., AAAI 2023) learns one global temperature for Hinton
KD adversarially: the student minimises the distillation loss, the temperature maximises it,
through a gradient reversal layer whose strength rises from 0 to ``grl_max`` along a cosine
curriculum (easy to hard). Like a feature adapter, :class:`CurriculumTemperature` trains with
the student and is kept in ``last.pt``'s training state, never in the student's weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``-strength``."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        """Returns a copy of ``x`` and keeps ``strength`` for the backward."""
        ctx.strength = strength
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        """Returns the reversed, scaled gradient (none for ``strength``)."""
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """``x`` unchanged; gradients flowing back through it are scaled by ``-strength``."""
    return _ReverseGradient.apply(x, strength)


def curriculum_strength(epoch: float, epochs: int, fraction: float, max_strength: float) -> float:
    """The reversal strength at ``epoch``: ``max * (1 - cos(pi * progress)) / 2``.

    ``progress`` is ``epoch / (fraction * epochs)``, capped at 1: the strength rises from 0 to
    ``max_strength`` over that share of the stage's epochs and stays there (CTKD's cosine
    curriculum; its released script reaches the maximum after 10 of 240 epochs).
    """
    span = fraction * epochs
    progress = min(epoch / span, 1.0) if span > 0 else 1.0
    return max_strength * (1 - math.cos(math.pi * progress)) / 2


class CurriculumTemperature(nn.Module):
    """CTKD's global temperature ``t_min + t_range * sigmoid(theta)`` behind gradient reversal.

    ``theta`` starts at 1, as CTKD's ``Global_T`` (``t_min + 0.73 * t_range`` then).

    Args:
        t_min: The lowest temperature (CTKD's ``t_start``).
        t_range: Width of the temperature range (CTKD's ``t_end``): T < t_min + t_range.
    """

    def __init__(self, t_min: float = 1.0, t_range: float = 20.0) -> None:
        super().__init__()
        self.t_min, self.t_range = t_min, t_range
        self.theta = nn.Parameter(torch.tensor(1.0))

    def forward(self, strength: float) -> Tensor:
        """The temperature (a 0-dim tensor); ``strength`` scales the reversed gradient."""
        return self.t_min + self.t_range * torch.sigmoid(reverse_gradient(self.theta, strength))
