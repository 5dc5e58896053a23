"""What the distill stage trains on and against: the transfer set and the objective.

    distill-cli distill kd=fitnet kd.kd_weight=0.9 stage.transfer_set=target dataset=usps ...

The transfer set adds unlabelled images to the labelled few-shot subset (their label is -1, so
only the distillation terms read them). The objective combines the label cross-entropy, a logit
term (the ``kd`` method, or Hinton KD beside a feature method) and a feature term whose
adapters train with the student but never enter its checkpoint. Like ``stages``, this module
reads the config; the losses beside it take plain arguments.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from distill_cli import checkpoint as ck
from distill_cli import rundir
from distill_cli.config import StageError
from distill_cli.data import convert, load_dataset, unlabeled_indices
from distill_cli.kd.features import FeatureDistiller, feature_shapes
from distill_cli.kd.losses import UNLABELLED
from distill_cli.kd.mixing import MIXERS
from distill_cli.kd.step import (
    CachedTeacher,
    DistillStep,
    LiveTeacher,
    Mixing,
    refuse_mixing,
    teacher_features,
)
from distill_cli.kd.teacher_cache import TeacherCache, cache_key
from distill_cli.kd.teacher_prep import (
    COMPILE_AFTER_S,
    PreparedTeacher,
    native_bf16_cpu,
    resolve,
    resolve_precision,
)
from distill_cli.kd.terms import Context, Term, build_terms

log = logging.getLogger("distill_cli")

__all__ = ["UNLABELLED", "NormalisedTeacher", "Objective", "objective", "source_dataset",
           "unlabeled_images", "with_own_normalisation"]  # fmt: skip


class Pools(NamedTuple):
    """The transfer set's unlabelled images, and those held out from them (never trained on)."""

    images: torch.Tensor  # to train on
    used: dict[str, list[int]]  # their indices, by pool: "target", "source"
    source: str | None  # the source dataset's name, when its images join
    held_out: torch.Tensor  # held out to measure fidelity to the teacher
    held_used: dict[str, list[int]]  # their indices, by pool


FIDELITY_IMAGES = 1000  # held out by default when stage.select=fidelity


def fidelity_images(stage: DictConfig) -> int:
    """How many unlabelled images ``stage`` holds out (``stage.fidelity_images``)."""
    n = stage.get("fidelity_images")
    if n is None:
        return FIDELITY_IMAGES if stage.get("select") == "fidelity" else 0
    return n


def unlabeled_images(
    cfg: DictConfig, x: torch.Tensor, exclude: torch.Tensor, teacher_path: str
) -> Pools:
    """The unlabelled images ``stage.transfer_set`` adds to the labelled subset.

    ``stage.fidelity_images`` of them (a seeded sample of the target's pool, or of the
    source's when the target adds none) are held out: never trained on, they measure the
    student's fidelity to its teacher.

    Args:
        cfg: The stage's config (reads ``stage.transfer_set``, ``stage.unlabeled_limit``).
        x: The target's training split, uint8 (N, C, H, W), already converted.
        exclude: Indices of ``x`` that are labelled or held out for validation.
        teacher_path: The teacher checkpoint, whose lineage names the source dataset.
    """
    transfer, limit = cfg.stage.transfer_set, cfg.stage.unlabeled_limit
    seed, n_held = cfg.dataset.subset_seed, fidelity_images(cfg.stage)
    parts, used, held, held_used, source_name = [], {}, [], {}, None
    pools = {}  # name -> (images, indices to skip, conversion to the target's shape)
    if transfer in ("target", "source+target"):
        pools["target"] = (x, exclude, lambda images: images)
    if transfer in ("source", "source+target"):
        source = source_dataset(teacher_path, cfg.dataset)
        source_name = source["name"]
        split = load_dataset(source, True, cfg.out_dir)
        pools["source"] = (split.x, torch.empty(0, dtype=torch.int64),
                           lambda images: convert(images, x.shape[-1], x.shape[1]))  # fmt: skip
    for name, (images, skip, prepare) in pools.items():
        if n_held and not held:  # the first pool: the target's when it joins
            idx = unlabeled_indices(len(images), skip, n_held, seed + 1)
            held.append(prepare(images[idx]))
            held_used[name] = idx.tolist()
            skip = torch.cat([skip, idx])
        idx = unlabeled_indices(len(images), skip, limit, seed)
        parts.append(prepare(images[idx]))
        used[name] = idx.tolist()
    images = torch.cat(parts) if parts else x[:0]
    log.info("transfer set %s: %d unlabelled images added (%s)%s", transfer, len(images),
             ", ".join(f"{k} {len(v)}" for k, v in used.items()) or "none",
             "".join(f"; {len(v)} {k} images held out for fidelity" for k, v in
                     held_used.items()))  # fmt: skip
    return Pools(images, used, source_name, torch.cat(held) if held else x[:0], held_used)


def source_dataset(teacher_path: str | Path, target: Mapping) -> dict:
    """The dataset config the teacher was pretrained on, found through its checkpoints' lineage.

    Walks from the teacher checkpoint up its stage folders' ``manifest.json`` parents to the
    first checkpoint trained on other data than ``target`` (a dataset config): another dataset,
    or the same one with other classes (a class split) or another root.
    """
    path, seen = Path(teacher_path), []
    while True:
        dataset = ck.load_checkpoint(path)["dataset"]
        seen.append(_describe(dataset))
        if _data_of(dataset) != _data_of(target):
            return dataset
        parent = rundir.parent_path(path.parent)
        if not parent:
            raise StageError(
                f"stage.transfer_set needs the teacher's source dataset, but its lineage "
                f"({' <- '.join(seen)}) has only {_describe(target)}; use "
                "stage.transfer_set=labeled or target, or a teacher pretrained on another dataset"
            )
        path = Path(parent)


def _data_of(dataset: Mapping) -> tuple:
    """What tells two datasets' images apart: name, root and classes."""
    classes = dataset.get("classes")
    return dataset["name"], dataset.get("root"), tuple(classes) if classes else None


def _describe(dataset: Mapping) -> str:
    classes = dataset.get("classes")
    return dataset["name"] + (f" {list(classes)}" if classes else "")


class NormalisedTeacher(torch.nn.Module):
    """The teacher, fed the student's batches normalised with the teacher's own statistics.

    Batches come normalised with the student's training-split mean and std; a teacher whose
    checkpoint records others (one taken straight from pretraining on the source) must see
    ``(x / 255 - mean_t) / std_t``. That is one per-channel multiply-add on the student's batch:
    ``x_t = x_s * std_s / std_t + (mean_s - mean_t) / std_t``.

    Args:
        teacher: The frozen teacher.
        student_stats: (mean, std) per channel the batches are normalised with.
        teacher_stats: (mean, std) per channel from the teacher's checkpoint.
    """

    def __init__(
        self,
        teacher: torch.nn.Module,
        student_stats: tuple[list[float], list[float]],
        teacher_stats: tuple[list[float], list[float]],
    ) -> None:
        super().__init__()
        self.teacher = teacher
        (mean_s, std_s), (mean_t, std_t) = (
            [torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in pair]
            for pair in (student_stats, teacher_stats)
        )
        self.register_buffer("scale", std_s / std_t, persistent=False)
        self.register_buffer("shift", (mean_s - mean_t) / std_t, persistent=False)

    @property
    def num_classes(self) -> int:
        """The teacher's class count."""
        return self.teacher.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for the re-normalised batch."""
        return self.teacher(x * self.scale + self.shift)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The teacher's logits and features for the re-normalised batch."""
        return self.teacher.forward_with_features(x * self.scale + self.shift)


def with_own_normalisation(
    teacher: torch.nn.Module, own: dict, student_stats: tuple[list[float], list[float]]
) -> tuple[torch.nn.Module, dict]:
    """The teacher as it must be fed: with its own checkpoint's normalisation.

    Args:
        teacher: The frozen teacher, on its device.
        own: ``{"mean", "std", "dataset"}`` from the teacher's checkpoint.
        student_stats: (mean, std) the batches are normalised with.

    Returns:
        The teacher to run (a :class:`NormalisedTeacher` where the statistics differ) and what
        metrics.json records about it.
    """
    mean, std = own["mean"], own["std"]
    if mean is None or (mean, std) == tuple(student_stats):
        log.info("teacher normalisation: the student's (its checkpoint's statistics are the same)")
        return teacher, {**own, "renormalised": False}
    log.info("teacher normalisation: its own checkpoint's (%s statistics, mean %s std %s); the "
             "student's batches are re-normalised for it", own["dataset"],
             [round(v, 4) for v in mean], [round(v, 4) for v in std])  # fmt: skip
    device = next(teacher.parameters()).device
    wrapped = NormalisedTeacher(teacher, student_stats, (mean, std)).to(device)
    return wrapped, {**own, "renormalised": True}


class Objective(NamedTuple):
    """What :func:`objective` builds for the distill stage."""

    loss_fn: Callable  # (model, x, y) -> (logits, {"loss", "ce", "kd"[, "feat"]})
    # trained with the student, never saved in it: feature adapters, CTKD's temperature
    adapters: torch.nn.Module | None
    cache: TeacherCache | None  # teacher outputs reused across epochs and jobs
    teacher: PreparedTeacher  # the teacher as it runs: prepared (stage.teacher_prep) and checked
    summary: Callable[[], dict] = dict  # what metrics.json should keep about the method


CACHE_BUDGET_BYTES = 2 * 1024**3  # a cache expected to grow past this is not kept


def objective(
    cfg: DictConfig,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    train,
    shape: tuple[int, int, int],
    device: torch.device,
    cache_at: tuple[Path, dict] | None = None,
    student_amp: bool = False,
) -> Objective:
    """The distill step (:class:`step.DistillStep`) for :func:`training.fit`, and its parts.

    Builds the parts in the order a step runs them: input mixing (``stage.mix``), the teacher's
    targets (the prepared teacher, or the teacher cache for unmixed batches), and the loss terms
    of the ``kd`` method, which say which features the two models must give.

    Args:
        cfg: The stage's config (reads the ``kd`` group and ``stage``).
        teacher: The frozen teacher, in eval mode (a :class:`NormalisedTeacher` where its
            statistics differ from the student's).
        student: The student being trained.
        train: The training loader; its ``epoch`` drives the schedules, its ``last_index`` gives
            CRD each image's memory-bank row (and its ``labels`` each row's class) and, with
            ``last_view``, the teacher cache its entry.
        shape: (channels, height, width) of the images.
        device: Where the adapters live.
        cache_at: (file, key parts) of the teacher cache from ``stages.cache_location``; None runs
            the teacher on every batch.
        student_amp: Whether the student trains under autocast (``stage.teacher_precision=auto``
            keeps the student's format then).
    """
    mixing = _mixing(cfg)
    shapes: dict[str, tuple[int, ...]] = {}  # the teacher's feature shapes, once a term asks

    def teacher_shapes() -> dict[str, tuple[int, ...]]:
        if not shapes:
            shapes.update(feature_shapes(teacher, shape[0], shape[1]))
        return shapes

    terms = _terms(cfg, (teacher, student), train, shape, device, teacher_shapes)
    if mixing is not None:
        _refuse(refuse_mixing, terms, cfg.kd.name)
        if cache_at is not None:
            log.info("teacher cache off: stage.mix=%s gives the teacher new images at every "
                     "step", mixing.name)  # fmt: skip
        cache_at = None
    names = teacher_features(terms)
    per_image = teacher.num_classes + sum(math.prod(teacher_shapes()[n]) for n in names)
    if cache_at is not None and not _cache_fits(cfg, per_image, names, train):
        cache_at = None
    prepared = _prepared_teacher(
        cfg, teacher, names, device, _teacher_forwards(cfg, train, cache_at), student_amp
    )
    cache = _cache(cache_at, prepared, names, train, device)
    source = LiveTeacher(prepared) if cache is None else CachedTeacher(cache)
    step = DistillStep(train, source, terms, mixing)
    return Objective(step, step.modules(), cache, prepared, step.summary)


def _mixing(cfg: DictConfig) -> Mixing | None:
    """``stage.mix``: None for ``none`` (or a config from before mixing)."""
    name = cfg.stage.get("mix") or "none"
    if name == "none":
        return None
    if name not in MIXERS:
        raise StageError(f"stage.mix={name} is not a mixing; valid: none, {', '.join(MIXERS)}")
    log.info("input mixing: %s with Beta(%g, %g) weights, teacher and student on the same "
             "mixed batch", name, cfg.stage.mix_alpha, cfg.stage.mix_alpha)  # fmt: skip
    return Mixing(name, cfg.stage.mix_alpha)


def _terms(cfg, models, train, shape, device, teacher_shapes) -> list[Term]:
    """The loss terms of ``cfg.kd`` (see ``terms.build_terms``); a refusal is one line.

    ``models`` is (teacher, student); ``teacher_shapes()`` gives the teacher's feature shapes.
    """
    c, size, _ = shape

    def feature_distiller(method: str, options: dict) -> FeatureDistiller:
        distiller = FeatureDistiller(
            method, feature_shapes(models[1], c, size), teacher_shapes(),
            num_samples=train.num_samples, labels=train.labels, **options,
        ).to(device)  # fmt: skip
        log.info("kd=%s: student %s, teacher %s%s", method, distiller.student_layers,
                 distiller.teacher_layers,
                 "".join(f"; {k} {v}" for k, v in distiller.record.items()))  # fmt: skip
        return distiller

    context = Context(stage_epochs(cfg), feature_distiller, device)
    return _refuse(build_terms, OmegaConf.to_container(cfg.kd), context)


def _refuse(build: Callable, *args):
    """``build(*args)``, with a ValueError (a method that cannot apply) as a one-line StageError."""
    try:
        return build(*args)
    except ValueError as exc:
        raise StageError(str(exc)) from None


def stage_epochs(cfg: DictConfig) -> int:
    """The distill stage's epochs: ``stage.transfer_epochs``, else ``stage.epochs``."""
    return cfg.stage.get("transfer_epochs") or cfg.stage.epochs


def _cache(cache_at, prepared: PreparedTeacher, names, train, device) -> TeacherCache | None:
    """The teacher cache at ``cache_at``, its key the preparation actually running; or None."""
    if cache_at is None:
        return None
    if prepared.asked == "auto":  # keep what a sweep already cached
        prepared.cached = next((p for p in ("fold", "compile") if _cache_file(
            cache_at, names, prepared.key(p)).exists()), None)  # fmt: skip
    if prepared.checked is None:  # the cache key records the outcome:
        batch = next(iter(train), None)  # compare with the plain teacher before the first step
        if batch is not None:
            prepared(batch[0])
    file = _cache_file(cache_at, names, prepared.key())
    return TeacherCache(prepared, train.num_samples, file, file.stem, device)


def _prepared_teacher(
    cfg, teacher, names, device, forwards: int = 0, student_amp: bool = False
) -> PreparedTeacher:
    """The teacher as ``stage.teacher_prep`` and ``stage.teacher_precision`` prepare it.

    ``forwards`` is the number of teacher forwards the job expects (what ``auto`` weighs);
    ``student_amp`` whether the student trains under autocast (what precision ``auto`` weighs).
    """
    precision = cfg.stage.get("teacher_precision")
    if precision == "float16" and device.type != "cuda":
        raise StageError(
            f"stage.teacher_precision=float16 runs only on CUDA, not on {device.type}; use "
            "bfloat16, float32 or null"
        )
    prep = resolve(cfg.stage.get("teacher_prep"), cfg.device.compile)
    after = cfg.stage.get("teacher_compile_after_s", COMPILE_AFTER_S)  # absent in older configs
    precision, why = resolve_precision(precision, device.type, student_amp, native_bf16_cpu())
    if why is not None:
        log.info("stage.teacher_precision=auto: %s", why)
    return PreparedTeacher(teacher, names, prep, precision, forwards, after, why)


def _teacher_forwards(cfg, train, cache_at) -> int:
    """The teacher forwards a job runs without a warm cache.

    Every batch of every epoch, or with the cache and ``stage.aug_views=K`` those of the first K
    epochs (later ones hit it).
    """
    views = cfg.stage.get("aug_views") if cache_at is not None else None
    epochs = stage_epochs(cfg) if not views else min(stage_epochs(cfg), views)
    return epochs * len(train)


def _cache_fits(cfg, per_image, names, train) -> bool:
    """Whether the teacher cache stays within ``CACHE_BUDGET_BYTES`` (it is off otherwise).

    ``per_image`` is the number of values cached per (view, image): logits and ``names``.
    """
    seen = stage_epochs(cfg) * len(train) * train.batch_size
    if cfg.stage.aug_views:
        seen = min(seen, cfg.stage.aug_views * train.num_samples)
    if 4 * per_image * seen > CACHE_BUDGET_BYTES:
        log.info("teacher cache off: about %.1f GB would exceed its %.0f GB budget (features %s)",
                 4 * per_image * seen / 1e9, CACHE_BUDGET_BYTES / 1e9, names)  # fmt: skip
        return False
    return True


def _cache_file(cache_at, names, prep: dict) -> Path:
    """The teacher cache's file for these outputs under the preparation ``prep`` (its key)."""
    folder, parts = cache_at
    key = cache_key({**parts, "outputs": ["logits", *names], "teacher_prep": prep})
    return folder / f"{key}.pt"
