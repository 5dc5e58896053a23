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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from distill_cli import checkpoint as ck
from distill_cli import rundir
from distill_cli.config import StageError
from distill_cli.data import convert, load_dataset, unlabeled_indices
from distill_cli.kd.features import FEATURE_METHODS, FeatureDistiller, feature_shapes
from distill_cli.kd.losses import UNLABELLED, distill_loss
from distill_cli.kd.teacher_cache import TeacherCache, cache_key
from distill_cli.kd.teacher_prep import COMPILE_AFTER_S, PreparedTeacher, resolve
from distill_cli.kd.temperature import CurriculumTemperature, curriculum_strength

log = logging.getLogger("distill_cli")

__all__ = ["UNLABELLED", "NormalisedTeacher", "Objective", "objective", "source_dataset",
           "unlabeled_images", "with_own_normalisation"]  # fmt: skip


def unlabeled_images(
    cfg: DictConfig, x: torch.Tensor, exclude: torch.Tensor, teacher_path: str
) -> tuple[torch.Tensor, dict[str, list[int]], str | None]:
    """The unlabelled images ``stage.transfer_set`` adds to the labelled subset.

    Args:
        cfg: The stage's config (reads ``stage.transfer_set``, ``stage.unlabeled_limit``).
        x: The target's training split, uint8 (N, C, H, W), already converted.
        exclude: Indices of ``x`` that are labelled or held out for validation.
        teacher_path: The teacher checkpoint, whose lineage names the source dataset.

    Returns:
        (images, {"target": indices, "source": indices}, source dataset name or None).
    """
    transfer, limit = cfg.stage.transfer_set, cfg.stage.unlabeled_limit
    seed = cfg.dataset.subset_seed
    parts, used, source_name = [], {}, None
    if transfer in ("target", "source+target"):
        idx = unlabeled_indices(len(x), exclude, limit, seed)
        parts.append(x[idx])
        used["target"] = idx.tolist()
    if transfer in ("source", "source+target"):
        source = source_dataset(teacher_path, cfg.dataset.name)
        source_name = source["name"]
        split = load_dataset(source, True, cfg.out_dir)
        idx = unlabeled_indices(len(split.x), torch.empty(0, dtype=torch.int64), limit, seed)
        parts.append(convert(split.x[idx], x.shape[-1], x.shape[1]))
        used["source"] = idx.tolist()
    images = torch.cat(parts) if parts else x[:0]
    log.info("transfer set %s: %d unlabelled images added (%s)", transfer, len(images),
             ", ".join(f"{k} {len(v)}" for k, v in used.items()) or "none")  # fmt: skip
    return images, used, source_name


def source_dataset(teacher_path: str | Path, target: str) -> dict:
    """The dataset config the teacher was pretrained on, found through its checkpoints' lineage.

    Walks from the teacher checkpoint up its stage folders' ``manifest.json`` parents to the
    first checkpoint trained on a dataset other than ``target``.
    """
    path, seen = Path(teacher_path), []
    while True:
        dataset = ck.load_checkpoint(path)["dataset"]
        seen.append(dataset["name"])
        if dataset["name"] != target:
            return dataset
        parent = rundir.parent_path(path.parent)
        if not parent:
            raise StageError(
                f"stage.transfer_set needs the teacher's source dataset, but its lineage "
                f"({' <- '.join(seen)}) has only {target}; use stage.transfer_set=labeled or "
                "target, or a teacher pretrained on another dataset"
            )
        path = Path(parent)


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
) -> Objective:
    """The distillation loss function for :func:`training.fit`, its adapters and teacher cache.

    Args:
        cfg: The stage's config (reads the ``kd`` group and ``stage.epochs``).
        teacher: The frozen teacher, in eval mode (a :class:`NormalisedTeacher` where its
            statistics differ from the student's).
        student: The student being trained.
        train: The training loader; its ``epoch`` drives ``kd.warmup_fraction`` and CTKD's
            curriculum, its ``last_index`` gives CRD each image's memory-bank row (and its
            ``labels`` each row's class) and, with ``last_view``, the teacher cache its entry.
        shape: (channels, height, width) of the images.
        device: Where the adapters live.
        cache_at: (file, key parts) of the teacher cache from ``stages.cache_location``; None runs
            the teacher on every batch.
    """
    kd = OmegaConf.to_container(cfg.kd)
    method, ce_w, kd_w = kd.pop("name"), kd.pop("ce_weight"), kd.pop("kd_weight")
    feat_w = kd.pop("feat_weight", 0.0)
    # the logit term ramps up linearly over this many epochs (mdistiller's DKD: 20 of 240)
    warmup = kd.pop("warmup_fraction", 0.0) * cfg.stage.epochs
    distiller, teacher_shapes, temperature, record = None, {}, None, {}
    if method in FEATURE_METHODS:
        logit_method, logit_options = "kd", {"temperature": kd.pop("temperature")}
        labels = train.labels if method == "crd" else None  # CRD draws negatives by class
        c, size, _ = shape
        teacher_shapes = feature_shapes(teacher, c, size)
        try:
            distiller = FeatureDistiller(
                method, feature_shapes(student, c, size), teacher_shapes,
                num_samples=train.num_samples, labels=labels, **kd,
            ).to(device)  # fmt: skip
        except ValueError as exc:  # a method that cannot apply to these models: one line
            raise StageError(str(exc)) from None
        record = distiller.record
        log.info(
            "kd=%s: student %s, teacher %s%s",
            method,
            distiller.student_layers,
            distiller.teacher_layers,
            "".join(f"; {k} {v}" for k, v in record.items()),
        )
    elif method == "ctkd":
        temperature = CurriculumTemperature(kd.pop("t_min"), kd.pop("t_range")).to(device)
        grl = {"fraction": kd.pop("grl_fraction"), "max_strength": kd.pop("grl_max")}
        logit_method, logit_options = method, kd
    else:
        logit_method, logit_options = method, kd
    names = list(distiller.teacher_layers) if distiller is not None else []
    per_image = teacher.num_classes + sum(math.prod(teacher_shapes[n]) for n in names)
    if cache_at is not None and not _cache_fits(cfg, per_image, names, train):
        cache_at = None
    prepared = _prepared_teacher(
        cfg, teacher, names, device, _teacher_forwards(cfg, train, cache_at)
    )
    if cache_at is not None and prepared.asked == "auto":  # keep what a sweep already cached
        prepared.cached = next((p for p in ("fold", "compile") if _cache_file(
            cache_at, names, prepared.key(p)).exists()), None)  # fmt: skip

    def teacher_outputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return prepared(x)

    if cache_at is not None and prepared.checked is None:  # the cache key records the outcome:
        batch = next(iter(train), None)  # compare with the plain teacher before the first step
        if batch is not None:
            teacher_outputs(batch[0])
    cache = None
    if cache_at is not None:
        file = _cache_file(cache_at, names, prepared.key())
        cache = TeacherCache(teacher_outputs, train.num_samples, file, file.stem, device)

    def loss_fn(model, x, y):
        ramp = min(1.0, train.epoch / warmup) if warmup else 1.0
        if cache is None:
            out = teacher_outputs(x)
        else:
            out = cache(x, train.last_index, train.last_view)
        if distiller is None:
            logits = model(x)
        else:
            logits, student_feats = model.forward_with_features(x)
        options = logit_options
        if temperature is not None:
            strength = curriculum_strength(train.epoch, cfg.stage.epochs, **grl)
            options = {**logit_options, "temperature": temperature(strength)}
        parts = distill_loss(logits, out["logits"], y, logit_method, ce_w, kd_w * ramp,
                             **options)  # fmt: skip
        if temperature is not None:
            parts["temperature"] = options["temperature"].detach()
        if distiller is not None:
            parts["feat"] = distiller(student_feats, out, train.last_index)
            parts["loss"] = parts["loss"] + feat_w * ramp * parts["feat"]
        return logits, parts

    def summary() -> dict:
        if temperature is None:
            return dict(record)
        with torch.no_grad():
            return {**record, "ctkd_temperature": round(temperature(0.0).item(), 4)}

    adapters = distiller if distiller is not None else temperature
    return Objective(loss_fn, adapters, cache, prepared, summary)


def _prepared_teacher(cfg, teacher, names, device, forwards: int = 0) -> PreparedTeacher:
    """The teacher as ``stage.teacher_prep`` and ``stage.teacher_precision`` prepare it.

    ``forwards`` is the number of teacher forwards the job expects (what ``auto`` weighs).
    """
    precision = cfg.stage.get("teacher_precision")
    if precision == "float16" and device.type != "cuda":
        raise StageError(
            f"stage.teacher_precision=float16 runs only on CUDA, not on {device.type}; use "
            "bfloat16, float32 or null"
        )
    prep = resolve(cfg.stage.get("teacher_prep"), cfg.device.compile)
    after = cfg.stage.get("teacher_compile_after_s", COMPILE_AFTER_S)  # absent in older configs
    return PreparedTeacher(teacher, names, prep, precision, forwards, after)


def _teacher_forwards(cfg, train, cache_at) -> int:
    """The teacher forwards a job runs without a warm cache.

    Every batch of every epoch, or with the cache and ``stage.aug_views=K`` those of the first K
    epochs (later ones hit it).
    """
    views = cfg.stage.get("aug_views") if cache_at is not None else None
    epochs = cfg.stage.epochs if not views else min(cfg.stage.epochs, views)
    return epochs * len(train)


def _cache_fits(cfg, per_image, names, train) -> bool:
    """Whether the teacher cache stays within ``CACHE_BUDGET_BYTES`` (it is off otherwise).

    ``per_image`` is the number of values cached per (view, image): logits and ``names``.
    """
    seen = cfg.stage.epochs * len(train) * train.batch_size
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
