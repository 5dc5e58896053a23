"""Input mixing for distillation: the whole batch mixed before the teacher and the student run.

    distill-cli distill stage.mix=mixup stage.mix_alpha=1.0 stage.transfer_set=target ...

Each image is mixed with a partner drawn from the same batch (a random permutation), labelled
and unlabelled images alike, with its own weight ``lam ~ Beta(alpha, alpha)``: mixup blends the
two images, cutmix pastes a box of the partner whose area is ``1 - lam``. The teacher then runs
on exactly the mixed batch the student sees (Beyer et al. 2022, "a good teacher is patient and
consistent"; big_vision's distill configs mix every image with Beta(1, 1)), so its outputs are
new at every step and never come from the teacher cache.

The draws use torch's global generator, which ``training.fit`` saves in ``last.pt``: a resumed
run mixes its remaining steps exactly as an uninterrupted one. A new transformation is a
function ``(images, lam, partner) -> (mixed images, lam actually used)`` and its entry in
``MIXERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MIXERS", "Mix", "cutmix", "draw", "mixup"]


def mixup(images: Tensor, lam: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al., ICLR 2018): ``lam * x + (1 - lam) * x[partner]`` per image.

    Args:
        images: A float batch (B, C, H, W).
        lam: (B,) weight of each image's own content, in [0, 1].
        partner: (B,) the batch position each image is mixed with.
    """
    w = lam.to(images.dtype).view(-1, 1, 1, 1)
    return w * images + (1 - w) * images[partner], lam


def cutmix(images: Tensor, lam: Tensor, partner: Tensor) -> tuple[Tensor, Tensor]:
    """CutMix (Yun et al., ICCV 2019): a box of area about ``1 - lam`` taken from the partner.

    Box sides are ``sqrt(1 - lam)`` of the image's, centred uniformly and clipped at the border;
    the returned ``lam`` is the share of each image that stayed its own after clipping.
    """
    b, _, h, w = images.shape
    side = (1 - lam.float()).clamp(0, 1).sqrt()
    centre = torch.rand(2, b).to(lam.device)  # drawn on the CPU: the same on every device
    rows, cols = _span(centre[0], side * h, h), _span(centre[1], side * w, w)
    r = torch.arange(h, device=lam.device).view(1, h, 1)
    c = torch.arange(w, device=lam.device).view(1, 1, w)
    inside = (r >= rows[0].view(-1, 1, 1)) & (r < rows[1].view(-1, 1, 1))
    inside = inside & (c >= cols[0].view(-1, 1, 1)) & (c < cols[1].view(-1, 1, 1))
    mask = inside.to(images.device).unsqueeze(1)  # (B, 1, H, W): True where the partner shows
    kept = 1 - mask.flatten(1).float().mean(1).to(lam.device)
    return torch.where(mask, images[partner], images), kept


def _span(centre: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Integer [start, end) of a box side of ``length`` around ``centre * size``, clipped."""
    mid = centre * size
    start = (mid - length / 2).round().clamp(0, size).long()
    end = (mid + length / 2).round().clamp(0, size).long()
    return start, end


# name -> (images, lam, partner) -> (mixed images, lam used); stage.mix=NAME
MIXERS: dict[str, Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "mixup": mixup,
    "cutmix": cutmix,
}


@dataclass(frozen=True)
class Mix:
    """One mixed batch: the images and what was drawn for them.

    Attributes:
        images: The mixed batch the teacher and the student both see.
        lam: (B,) share of each image that is its own (1: unmixed).
        partner: (B,) batch position of each image's partner.
    """

    images: Tensor
    lam: Tensor
    partner: Tensor


def draw(images: Tensor, name: str, alpha: float) -> Mix:
    """Mixes ``images`` with ``MIXERS[name]``: weights from Beta(alpha, alpha), a random pairing.

    The weights and the pairing are drawn on the CPU from torch's global generator (the same
    numbers on every device), then moved to the batch's device.

    Raises:
        ValueError: ``name`` is not in :data:`MIXERS`.
    """
    if name not in MIXERS:
        raise ValueError(f"unknown stage.mix '{name}'; valid: none, {', '.join(MIXERS)}")
    b = len(images)
    concentration = torch.tensor(float(alpha))
    lam = torch.distributions.Beta(concentration, concentration).sample((b,))
    partner = torch.randperm(b)
    mixed, lam = MIXERS[name](images, lam.to(images.device), partner.to(images.device))
    return Mix(mixed, lam, partner.to(images.device))
