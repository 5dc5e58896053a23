"""The distill step as a short pipeline of parts: batch, mixing, teacher, student, terms, loss.

    distill-cli distill stage.mix=mixup kd=kd ...

:class:`DistillStep` is the loss function ``training.fit`` calls, ``(model, x, y) -> (logits,
parts)``, the way big_vision's distill ``update_fn`` reads: take the batch, mix it, run the
teacher on it, run the student on it, add up the terms. Each part has one job and is built once
by ``distillation.objective``; a new input transformation, teacher source or loss term is a new
part, not a branch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.autograd.profiler import record_function

from distill_cli.kd.mixing import draw
from distill_cli.kd.teacher_cache import TeacherCache
from distill_cli.kd.terms import Batch, Outputs, Term

# (batch) -> the teacher's outputs by name: "logits" and the features the terms read
TeacherFn = Callable[[Batch], dict[str, Tensor]]


class LiveTeacher:
    """The prepared teacher, run on every batch (mixed batches always take this path)."""

    def __init__(self, teacher: Callable[[Tensor], dict[str, Tensor]]) -> None:
        self.teacher = teacher

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        """The teacher's outputs for the batch's images."""
        return self.teacher(batch.images)


class CachedTeacher:
    """The teacher's outputs per (view, image) from a :class:`TeacherCache`, computed once."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        """Cached outputs for the batch's rows and views; the teacher runs on the misses."""
        return self.cache(batch.images, batch.index, batch.view)


class Mixing:
    """Input mixing, ``stage.mix``: the whole batch, before the teacher and the student run."""

    def __init__(self, name: str, alpha: float) -> None:
        self.name, self.alpha = name, alpha

    def __call__(self, batch: Batch) -> Batch:
        """The batch with mixed images and what was drawn (see ``mixing.draw``)."""
        mix = draw(batch.images, self.name, self.alpha)
        return Batch(mix.images, batch.labels, batch.epoch, batch.index, batch.view, mix)


class DistillStep:
    """The distillation loss function for :func:`training.fit`.

    Args:
        loader: The training loader; its ``epoch``, ``last_index`` and ``last_view`` describe
            the batch it just gave.
        teacher: The teacher's outputs for a batch (:class:`LiveTeacher`, :class:`CachedTeacher`).
        terms: The loss terms, summed in order with their weights.
        mixing: Input mixing, or None.
    """

    def __init__(self, loader, teacher: TeacherFn, terms: Sequence[Term],
                 mixing: Mixing | None = None) -> None:  # fmt: skip
        self.loader, self.teacher, self.terms, self.mixing = loader, teacher, terms, mixing
        self.student_features = any(term.student_features for term in terms)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        """One step's logits and loss parts: ``{"loss", <term names>, [logged values]}``."""
        batch = self.batch(x, y)
        if self.mixing is not None:
            with record_function("mixing"):
                batch = self.mixing(batch)
        with record_function("teacher"):
            targets = self.teacher(batch)
        with record_function("student"):
            outputs = self.student(model, batch)
        with record_function("terms"):
            return outputs.logits, self.loss(outputs, targets, batch)

    def batch(self, x: Tensor, y: Tensor) -> Batch:
        """The loader's batch, with the rows and views of its images and the epoch."""
        loader = self.loader
        index, view = getattr(loader, "last_index", None), getattr(loader, "last_view", None)
        return Batch(x, y, getattr(loader, "epoch", 0), index, view)

    def student(self, model: nn.Module, batch: Batch) -> Outputs:
        """The student's logits, and its features when a term reads them."""
        if not self.student_features:
            return Outputs(model(batch.images))
        logits, features = model.forward_with_features(batch.images)
        return Outputs(logits, features)

    def loss(self, s: Outputs, t: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """The weighted sum of the terms, with each unweighted term beside it."""
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None
        for term in self.terms:
            value = term.value(s, t, batch)
            parts[term.name] = value
            weighted = term.weight_at(batch) * value
            total = weighted if total is None else total + weighted
            parts.update(term.logged())
        return {"loss": total, **parts}

    def modules(self) -> nn.Module | None:
        """What trains with the student and is never saved in it (adapters, a temperature)."""
        found = [term.module for term in self.terms if term.module is not None]
        if not found:
            return None
        return found[0] if len(found) == 1 else nn.ModuleList(found)

    def summary(self) -> dict:
        """What metrics.json keeps about the method."""
        out: dict = {}
        for term in self.terms:
            out.update(term.summary())
        return out


def teacher_features(terms: Sequence[Term]) -> list[str]:
    """The teacher outputs besides the logits that the terms read, in order, once each."""
    names: list[str] = []
    for term in terms:
        names += [n for n in term.teacher_features if n not in names]
    return names


def refuse_mixing(terms: Sequence[Term], method: str) -> None:
    """Raises ValueError when a term cannot read mixed images (it needs each image's row)."""
    if any(term.needs_index for term in terms):
        raise ValueError(
            f"kd={method} cannot distill mixed images: it keeps one memory-bank row per "
            "training image, and a mixed image is two; use stage.mix=none or another kd method"
        )
