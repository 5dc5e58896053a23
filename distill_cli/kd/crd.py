"""Contrastive representation distillation: ``distill-cli distill kd=crd``.

:class:`CRD` holds the embedding heads and the two memory banks (one row per transfer-set image)
and draws each anchor's negatives: from the other classes where its label is known
(``kd.nce_negatives=other_class``, RepDistiller's exact mode), else from every other row.
``features.FeatureDistiller`` builds it for ``kd=crd``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NEGATIVES = ("other_class", "uniform")  # how CRD draws the negatives of a labelled anchor


@dataclass(frozen=True)
class NCE:
    """CRD's noise-contrastive estimation: the ``kd.nce_*`` options, with the paper's defaults.

    Attributes:
        k: Negatives per positive, capped at the memory bank's rows minus one.
        t: Temperature of the scores.
        m: Momentum of the memory update.
        negatives: How a labelled anchor's negatives are drawn, one of ``NEGATIVES``.
    """

    k: int = 16384
    t: float = 0.07
    m: float = 0.5
    negatives: str = "other_class"

    def __post_init__(self) -> None:
        if self.negatives not in NEGATIVES:
            raise ValueError(
                f"kd.nce_negatives={self.negatives!r} is invalid; valid: {', '.join(NEGATIVES)}"
            )


class _Embed(nn.Module):
    """Linear projection onto the unit sphere: CRD's embedding head."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRD(nn.Module):
    """Contrastive representation distillation (Tian et al., ICLR 2020), after RepDistiller.

    Each sample's student embedding is contrasted with the teacher memory bank (its own row
    positive, ``k`` rows negative) and the other way round; the NCE losses of the two anchors
    are added. The banks hold a momentum average of each sample's embeddings.

    Negatives are drawn with replacement. With ``nce.negatives="other_class"`` (RepDistiller's
    ``exact`` mode) a labelled anchor's come from the labelled rows of the other classes; an
    unlabelled anchor's (label -1), and every anchor's with ``"uniform"``, from all rows but
    its own.

    Args:
        student_dim: Size of the student feature.
        teacher_dim: Size of the teacher feature.
        num_samples: Training-set size: rows of each memory bank.
        feat_dim: Embedding size.
        nce: Negatives per positive (capped at ``num_samples - 1``), temperature, momentum,
            and how negatives are drawn.
        labels: Class of each row (``num_samples``,), -1 where unknown; None: all unknown.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_samples: int,
        feat_dim: int = 128,
        nce: NCE = NCE(),
        labels: Tensor | None = None,
    ):
        super().__init__()
        self.embed_student = _Embed(student_dim, feat_dim)
        self.embed_teacher = _Embed(teacher_dim, feat_dim)
        self.num_samples, self.k = num_samples, min(nce.k, num_samples - 1)
        self.nce_t, self.nce_m = nce.t, nce.m
        bound = 1 / math.sqrt(feat_dim / 3)  # ContrastMemory's initialisation
        for name in ("memory_student", "memory_teacher"):
            self.register_buffer(name, torch.rand(num_samples, feat_dim) * 2 * bound - bound)
        # NCE normalisation constants; negative until the first batch estimates them
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        if labels is None or nce.negatives == "uniform":
            labels = torch.full((num_samples,), -1, dtype=torch.int64)
        self._index_classes(labels.long().cpu())

    def _index_classes(self, labels: Tensor) -> None:
        """Labelled rows sorted by class, and each class's block in that order (not saved)."""
        if len(labels) != self.num_samples:
            raise ValueError(f"CRD needs one label per row: {len(labels)} for {self.num_samples}")
        known = labels >= 0
        order = known.nonzero().flatten()
        order = order[labels[order].argsort(stable=True)]
        count = torch.bincount(labels[known], minlength=int(labels.max().clamp(min=0)) + 1)
        start = count.cumsum(0) - count
        # a class holding every labelled row has no other-class rows: its anchors draw uniformly
        labels = torch.where(known & (count[labels.clamp(min=0)] < len(order)), labels, -1)
        for name, value in (("row_label", labels), ("class_order", order),
                            ("class_start", start), ("class_count", count)):  # fmt: skip
            self.register_buffer(name, value if len(value) else value.new_zeros(1), False)
        # anchors (rows) whose negatives come from the other classes, and those drawn uniformly
        self.negative_draws = {"other_class": int((labels >= 0).sum()),
                               "uniform": int((labels < 0).sum())}  # fmt: skip

    def sample_negatives(self, index: Tensor) -> Tensor:
        """``k`` negative rows for each anchor row in ``index`` (B,), from the global RNG."""
        label = self.row_label[index]
        known = label >= 0
        c = label.clamp(min=0)
        n_known = len(self.class_order) if self.negative_draws["other_class"] else 0
        # Draw r uniformly from the candidates, then step over the excluded block: the anchor's
        # class in the class order (labelled), or the anchor itself (unlabelled).
        size = torch.where(known, n_known - self.class_count[c], self.num_samples - 1)
        skip_from = torch.where(known, self.class_start[c], index)
        skip = torch.where(known, self.class_count[c], 1)
        u = torch.rand(len(index), self.k, device=index.device)
        r = torch.minimum((u * size[:, None]).long(), size[:, None] - 1)
        r = r + (r >= skip_from[:, None]) * skip[:, None]
        by_class = self.class_order[r.clamp(max=len(self.class_order) - 1)]
        return torch.where(known[:, None], by_class, r)

    def _probs(self, anchor: Tensor, bank: Tensor, rows: Tensor, z: Tensor) -> Tensor:
        """exp(<bank row, anchor> / T) / Z for the (B, k + 1) rows; sets Z on the first call."""
        scores = torch.exp(torch.bmm(bank[rows], anchor[:, :, None]).squeeze(2) / self.nce_t)
        # where() rather than `if z < 0`: no host-device sync; divide by a copy, not the buffer
        z_now = torch.where(z < 0, scores.detach().mean() * self.num_samples, z)
        z.copy_(z_now)
        return scores / z_now

    def _nce(self, probs: Tensor) -> Tensor:
        """Eq. 18: -log h(positive) - sum log(1 - h(negative)), summed, over the batch size."""
        noise = (probs.shape[1] - 1) / self.num_samples  # k * P_noise
        eps = 1e-7
        log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + eps))
        log_neg = torch.log(noise / (probs[:, 1:] + noise + eps))
        return -(log_pos.sum() + log_neg.sum()) / probs.shape[0]

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, index: Tensor) -> Tensor:
        """Returns the CRD loss and updates both memory banks at rows ``index`` (B,)."""
        index = index.long()
        with torch.autocast(student_emb.device.type, enabled=False):
            s = self.embed_student(student_emb.float())
            t = self.embed_teacher(teacher_emb.detach().float())
            rows = torch.cat([index[:, None], self.sample_negatives(index)], dim=1)
            loss = self._nce(self._probs(s, self.memory_teacher, rows, self.z_student))
            loss = loss + self._nce(self._probs(t, self.memory_student, rows, self.z_teacher))
            with torch.no_grad():
                for bank, emb in ((self.memory_student, s), (self.memory_teacher, t)):
                    mixed = bank[index] * self.nce_m + emb * (1 - self.nce_m)
                    bank.index_copy_(0, index, F.normalize(mixed, dim=1))
        return loss
