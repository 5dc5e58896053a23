"""Which checkpoint a stage keeps: validation scores and the best-so-far rule.

    distill-cli distill stage.select=fidelity stage.fidelity_images=1000 stage.transfer_set=target

:func:`evaluate` scores labelled batches (top-1, top-5, NLL). :class:`Fidelity` scores how
closely the student follows its teacher on held-out *unlabelled* images (top-1 agreement and
KL), which needs no label at all. :class:`Validation` runs both each validated epoch and says
which score picks ``best.pt``: ``val`` (the labelled validation accuracy) or ``fidelity`` (the
agreement, ties broken by the lower KL). It also follows the other criterion, so metrics.json
can say which epoch each would have kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from distill_cli import distributed

SELECT = ("val", "fidelity")  # stage.select
# the score each criterion maximises, from an epoch's metrics row
_SCORE: dict[str, Callable[[dict], list[float]]] = {
    "val": lambda row: [row["val_acc"]],
    "fidelity": lambda row: [row["fid_agree"], -row["fid_kl"]],
}


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, batches: Iterable, amp: contextlib.AbstractContextManager | None = None
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) and mean negative log-likelihood over all batches."""
    model.eval()
    correct1 = correct5 = nll = count = 0.0
    for x, y in batches:
        with amp or contextlib.nullcontext():
            logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        count += len(y)
    if distributed.world() > 1:  # each process saw its share of the batches
        sums = torch.tensor([correct1, correct5, nll, count], dtype=torch.float64)
        correct1, correct5, nll, count = distributed.all_reduce_sum(sums).tolist()
    if count == 0:
        return {"top1": float("nan"), "top5": float("nan"), "nll": float("nan"), "n": 0}
    return {
        "top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "nll": nll / count,
        "n": int(count),
    }  # fmt: skip


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """Summed top-1 agreement (count) and summed KL(teacher || student) at T = 1 over a batch."""
    log_s = F.log_softmax(student.float(), dim=1)
    log_t = F.log_softmax(teacher.float(), dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)
    same = (student.argmax(1) == teacher.argmax(1)).sum()
    return same.item(), kl.sum().item()


class Fidelity:
    """The student's fidelity to its teacher on held-out unlabelled images.

    The teacher's logits are computed once per batch, at the first call (the batches must come
    in the same order every time: an unshuffled, unaugmented loader).

    Args:
        batches: Held-out images, never trained on (labels are ignored).
        teacher: Maps a batch to the teacher's outputs (``{"logits": ...}``).
    """

    def __init__(self, batches: Iterable, teacher: Callable[[torch.Tensor], dict]) -> None:
        self.batches, self.teacher = batches, teacher
        self._targets: list[torch.Tensor] | None = None

    @torch.inference_mode()
    def __call__(
        self, model: torch.nn.Module, amp: contextlib.AbstractContextManager | None = None
    ) -> dict[str, float]:
        """``fid_agree`` (percent of images with the teacher's top-1) and ``fid_kl`` (mean)."""
        model.eval()
        fresh = self._targets is None
        targets = [] if fresh else self._targets
        same = kl = count = 0.0
        for i, (x, _) in enumerate(self.batches):
            with amp or contextlib.nullcontext():
                if fresh:
                    targets.append(self.teacher(x)["logits"].float())
                logits = model(x).float()
            s, k = agreement(logits, targets[i])
            same, kl, count = same + s, kl + k, count + len(x)
        self._targets = targets
        if distributed.world() > 1:
            sums = torch.tensor([same, kl, count], dtype=torch.float64)
            same, kl, count = distributed.all_reduce_sum(sums).tolist()
        return {"fid_agree": 100 * same / max(count, 1), "fid_kl": kl / max(count, 1)}


class Validation:
    """What a validated epoch measures, and which score keeps ``best.pt``.

    Args:
        labelled: Labelled validation batches, or None.
        fidelity: A :class:`Fidelity` on held-out unlabelled images, or None.
        select: ``val`` or ``fidelity``: the criterion ``best.pt`` follows.

    Raises:
        ValueError: ``select`` names a criterion nothing here measures.
    """

    def __init__(self, labelled: Iterable | None, fidelity: Fidelity | None = None,
                 select: str = "val") -> None:  # fmt: skip
        if select not in SELECT:
            raise ValueError(f"unknown stage.select '{select}'; valid: {', '.join(SELECT)}")
        if (labelled if select == "val" else fidelity) is None:
            raise ValueError(f"stage.select={select} has nothing to measure it on")
        self.labelled, self.fidelity, self.select = labelled, fidelity, select
        self.criteria = [c for c, part in zip(SELECT, (labelled, fidelity), strict=True) if part]

    def __call__(self, model: torch.nn.Module, amp=None) -> dict[str, float]:
        """The epoch's validation entries: ``val_acc``, ``val_top5``, ``val_nll``, ``fid_*``."""
        row: dict[str, float] = {}
        if self.labelled is not None:
            scores = evaluate(model, self.labelled, amp)
            row.update(val_acc=scores["top1"], val_top5=scores["top5"], val_nll=scores["nll"])
        if self.fidelity is not None:
            row.update(self.fidelity(model, amp))
        return row

    def improved(self, row: dict, picks: dict) -> list[str]:
        """The criteria whose best so far (in ``picks``) this row beats, updating ``picks``."""
        better = []
        for criterion in self.criteria:
            score, pick = _SCORE[criterion](row), picks.get(criterion)
            if pick is None or score > pick["score"]:
                keep = {k: row[k] for k in ("epoch", "val_acc", "fid_agree", "fid_kl") if k in row}
                picks[criterion] = {**keep, "score": score}
                better.append(criterion)
        return better


def as_validation(val: Iterable | Validation | None) -> Validation | None:
    """``val`` as a :class:`Validation`: plain labelled batches select on their accuracy."""
    if val is None or isinstance(val, Validation):
        return val
    return Validation(val)
