"""The terms of the distillation loss, each declaring what it reads.

    distill-cli distill kd=dkd kd.warmup_fraction=0.1 ...      # labels + a logit term, ramped
    distill-cli distill kd=fitnet kd.kd_weight=1 ...           # labels + Hinton KD + a feature term

A :class:`Term` is a weight and an unweighted value computed from the student's outputs, the
teacher's targets and the batch. It declares what it needs (the teacher's features, the
student's features, each image's row in the transfer set, a trained module), so that the
distill step asks for exactly that and refuses what cannot be given (an image's row once
images are mixed). Schedules wrap a term: :class:`Warmup` ramps its weight, CTKD's learned
temperature is an option :class:`LogitTerm` reads at each step. :func:`build_terms` makes a
method's terms from the ``kd`` config by the method's name, through ``BUILDERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill_cli.kd.features import FEATURE_METHODS, METHODS, FeatureDistiller
from distill_cli.kd.losses import (
    LOGIT_METHODS,
    UNLABELLED,
    check_logit_method,
    logit_term,
    masked_cross_entropy,
    mixed_cross_entropy,
)
from distill_cli.kd.mixing import Mix
from distill_cli.kd.temperature import CurriculumTemperature, curriculum_strength


@dataclass
class Batch:
    """One step's inputs as the terms see them.

    Attributes:
        images: What the teacher and the student run on (mixed, when mixing is on).
        labels: Class of each image, -1 for unlabelled ones.
        epoch: The loader's epoch (schedules read it).
        index: Each image's row in the transfer set (CRD's memory bank, the teacher cache).
        view: Each image's augmentation view (the teacher cache).
        mix: What mixing drew, None for an unmixed batch.
    """

    images: Tensor
    labels: Tensor
    epoch: int = 0
    index: Tensor | None = None
    view: Tensor | None = None
    mix: Mix | None = None


@dataclass
class Outputs:
    """The student's logits, and its features when a term reads them."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


class Term:
    """A weighted loss term; subclasses compute :meth:`value`.

    Attributes:
        name: The term's key in the step's parts and metrics (``train_<name>``).
        weight: Its weight in the loss.
        teacher_features: Teacher outputs besides the logits it reads.
        student_features: Whether it reads the student's features.
        needs_index: Whether it reads each image's row in the transfer set (no mixing then).
        module: Parameters trained with the student and never saved in it, or None.
    """

    name = "term"
    teacher_features: tuple[str, ...] = ()
    student_features = False
    needs_index = False
    module: nn.Module | None = None

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def weight_at(self, batch: Batch) -> float:
        """The weight at this step (schedules override it)."""
        return self.weight

    def value(self, s: Outputs, t: dict[str, Tensor], batch: Batch) -> Tensor:
        """The unweighted term."""
        raise NotImplementedError

    def logged(self) -> dict[str, Tensor]:
        """Values besides the term to log each step (CTKD's temperature)."""
        return {}

    def summary(self) -> dict:
        """What metrics.json keeps about the term."""
        return {}


class LabelTerm(Term):
    """Cross-entropy on the labelled images; a mixed image counts both labels by its weights."""

    name = "ce"

    def value(self, s: Outputs, t: dict[str, Tensor], batch: Batch) -> Tensor:
        """Masked cross-entropy, or mixup's two-label cross-entropy for a mixed batch."""
        if batch.mix is None:
            return masked_cross_entropy(s.logits, batch.labels)
        return mixed_cross_entropy(s.logits, batch.labels, batch.mix.lam, batch.mix.partner)


class LogitTerm(Term):
    """A logit method (``losses.LOGIT_METHODS``) on the teacher's logits.

    Args:
        weight: ``kd.kd_weight``.
        method: The method's name.
        options: Its options (temperature, ...), ``logit_standardize`` included.
        temperature: A learned temperature (CTKD) and its curriculum, or None.
    """

    name = "kd"

    def __init__(self, weight: float, method: str, options: dict,
                 temperature: LearnedTemperature | None = None) -> None:  # fmt: skip
        super().__init__(weight)
        check_logit_method(method, bool(options.get("logit_standardize")))
        self.method, self.options, self.temperature = method, options, temperature
        self.module = temperature.module if temperature is not None else None
        self._logged: dict[str, Tensor] = {}

    def value(self, s: Outputs, t: dict[str, Tensor], batch: Batch) -> Tensor:
        """The method's term (a mixed image's class, where DKD reads one, is the teacher's top)."""
        labels = batch.labels if batch.mix is None else torch.full_like(batch.labels, UNLABELLED)
        options = self.options
        if self.temperature is not None:
            options = {**options, "temperature": self.temperature(batch.epoch)}
            self._logged = {"temperature": options["temperature"].detach()}
        return logit_term(s.logits, t["logits"], labels, self.method, **options)

    def logged(self) -> dict[str, Tensor]:
        """The temperature used at this step, when it is learned."""
        return self._logged

    def summary(self) -> dict:
        """CTKD: the temperature the stage ended with."""
        return self.temperature.summary() if self.temperature is not None else {}


class LearnedTemperature:
    """CTKD's temperature: a module trained with the student behind a reversal curriculum."""

    def __init__(self, module: CurriculumTemperature, epochs: int, fraction: float,
                 max_strength: float) -> None:  # fmt: skip
        self.module, self.epochs = module, epochs
        self.fraction, self.max_strength = fraction, max_strength

    def __call__(self, epoch: int) -> Tensor:
        """The temperature at ``epoch``, its gradient reversed with the curriculum's strength."""
        return self.module(curriculum_strength(epoch, self.epochs, self.fraction,
                                               self.max_strength))  # fmt: skip

    def summary(self) -> dict:
        """The learned temperature at the end, in metrics.json."""
        with torch.no_grad():
            return {"ctkd_temperature": round(self.module(0.0).item(), 4)}


class FeatureTerm(Term):
    """A feature method (``features.METHODS``) through its :class:`FeatureDistiller`."""

    name = "feat"
    student_features = True

    def __init__(self, weight: float, distiller: FeatureDistiller) -> None:
        super().__init__(weight)
        self.distiller = self.module = distiller
        self.teacher_features = tuple(distiller.teacher_layers)
        self.needs_index = METHODS[distiller.method].needs_index

    def value(self, s: Outputs, t: dict[str, Tensor], batch: Batch) -> Tensor:
        """The method's unweighted loss on the two models' features."""
        return self.distiller(s.features, t, batch.index)

    def summary(self) -> dict:
        """What the method chose (CRD: how negatives were drawn)."""
        return dict(self.distiller.record)


class Warmup(Term):
    """A term whose weight ramps linearly from 0 over ``epochs`` (``kd.warmup_fraction``)."""

    def __init__(self, term: Term, epochs: float) -> None:
        super().__init__(term.weight)
        self.term, self.epochs = term, epochs
        self.name, self.module = term.name, term.module
        self.teacher_features, self.student_features = term.teacher_features, term.student_features
        self.needs_index = term.needs_index

    def weight_at(self, batch: Batch) -> float:
        """The inner weight times ``min(1, epoch / epochs)``."""
        return self.term.weight_at(batch) * min(1.0, batch.epoch / self.epochs)

    def value(self, s: Outputs, t: dict[str, Tensor], batch: Batch) -> Tensor:
        """The inner term's value."""
        return self.term.value(s, t, batch)

    def logged(self) -> dict[str, Tensor]:
        """The inner term's logged values."""
        return self.term.logged()

    def summary(self) -> dict:
        """The inner term's summary."""
        return self.term.summary()


@dataclass(frozen=True)
class Context:
    """What building a method's terms may read besides the ``kd`` config.

    Attributes:
        epochs: The stage's epochs (CTKD's curriculum length).
        feature_distiller: Builds a method's :class:`FeatureDistiller` (it needs both models'
            feature shapes): ``(method, options) -> distiller``.
        device: Where trained modules live.
    """

    epochs: int
    feature_distiller: Callable[[str, dict], FeatureDistiller]
    device: torch.device


def _logit(method: str, kd: dict, ctx: Context) -> list[Term]:
    kd.pop("feat_weight", None)  # a logit method has no feature term (config.check: weight 0)
    return [LogitTerm(kd.pop("kd_weight"), method, kd)]


def _ctkd(method: str, kd: dict, ctx: Context) -> list[Term]:
    module = CurriculumTemperature(kd.pop("t_min"), kd.pop("t_range")).to(ctx.device)
    temperature = LearnedTemperature(module, ctx.epochs, kd.pop("grl_fraction"), kd.pop("grl_max"))
    return [LogitTerm(kd.pop("kd_weight"), method, kd, temperature)]


def _feature(method: str, kd: dict, ctx: Context) -> list[Term]:
    """Hinton KD at ``kd.temperature`` beside the feature term (weight ``kd.kd_weight``)."""
    kd_term = LogitTerm(kd.pop("kd_weight"), "kd", {"temperature": kd.pop("temperature")})
    feat_weight = kd.pop("feat_weight")
    return [kd_term, FeatureTerm(feat_weight, ctx.feature_distiller(method, kd))]


# kd.name -> (method, remaining kd options, context) -> the method's terms, label term excluded
BUILDERS: dict[str, Callable[[str, dict, Context], list[Term]]] = {
    **dict.fromkeys(LOGIT_METHODS, _logit),
    "ctkd": _ctkd,
    **dict.fromkeys(FEATURE_METHODS, _feature),
}


def build_terms(kd: dict[str, Any], ctx: Context) -> list[Term]:
    """The label term and the method's terms from the ``kd`` config (a plain dict).

    ``kd.warmup_fraction`` wraps every term but the label one in :class:`Warmup`.
    """
    kd = dict(kd)
    method, ce_weight = kd.pop("name"), kd.pop("ce_weight")
    warmup = kd.pop("warmup_fraction", 0.0) * ctx.epochs
    if method not in BUILDERS:
        raise ValueError(f"unknown kd method '{method}'; valid: {', '.join(BUILDERS)}")
    terms = BUILDERS[method](method, kd, ctx)
    if warmup:
        terms = [Warmup(term, warmup) for term in terms]
    return [LabelTerm(ce_weight), *terms]
