"""One function per stage: pretrain, finetune, distill, eval. Only this layer reads the config.

    distill-cli pretrain dataset=glyphs_source model=resnet8x4 run=demo
    distill-cli finetune dataset=glyphs_target dataset.shots=10 run=demo
    distill-cli distill  dataset=glyphs_target dataset.shots=10 model=cnn run=demo
    distill-cli eval run=demo

Each stage reads its input from the run directory, trains with :func:`training.fit`, and leaves a
self-describing stage folder: config.yaml, best.pt, last.pt, metrics.jsonl, metrics.json,
stage.log, indices.json and manifest.json.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from distill_cli import checkpoint as ck
from distill_cli import distributed, rundir, runtime, search
from distill_cli.data import (
    Augment,
    BatchLoader,
    ImageFiles,
    Normalise,
    Order,
    StreamLoader,
    TransferLoader,
    channel_stats,
    convert,
    labels_per_class,
    split_indices,
)
from distill_cli.eval_stage import evaluate_run, export_run
from distill_cli.kd import distillation
from distill_cli.kd.teacher_cache import TeacherCache
from distill_cli.models import build_model, count_params, display_name
from distill_cli.selection import Fidelity, Validation
from distill_cli.stagefolder import Stage, StageError, finish, running
from distill_cli.training import (
    Checkpointing,
    Reporting,
    Schedule,
    Step,
    build_optimizer,
    build_scheduler,
    fit,
    set_rng,
)

log = logging.getLogger("distill_cli")


@dataclass
class Data:
    """Training and validation batches of one dataset, plus what a checkpoint must remember."""

    train: BatchLoader
    val: BatchLoader | None
    num_classes: int
    shape: tuple[int, int, int]  # channels, height, width
    info: dict  # dataset config, class names and normalisation, saved in checkpoints
    streamed: bool = False  # an image folder left on disk, decoded per batch
    fidelity: BatchLoader | None = None  # held-out unlabelled images (stage.fidelity_images)


@dataclass
class Phase:
    """One call of :func:`training.fit` within a stage (a linear probe, then the rest)."""

    epochs: int
    first_epoch: int = 1
    frozen_backbone: bool = False
    best: dict | None = None  # the best epoch and accuracy of the phase before


def run_stage(cfg: DictConfig, job_subdir: str | None = None) -> float | None:
    """Run the stage ``cfg.stage.name``; return the best validation accuracy (for sweepers)."""
    return STAGES[cfg.stage.name](cfg, job_subdir)


def pretrain(cfg: DictConfig, job_subdir: str | None = None) -> float | None:
    """Train ``model`` on ``dataset`` from random initialisation."""
    with running(cfg, job_subdir) as st:
        data = _load_data(st)
        model = _build(cfg, data).to(st.device)
        summary = _train(st, model, data, _cross_entropy(cfg), Phase(cfg.stage.epochs))
        return _finish(st, model, summary)


def finetune(cfg: DictConfig, job_subdir: str | None = None) -> float | None:
    """Load the upstream checkpoint, fit its head to the target's classes, and train on it."""
    with running(cfg, job_subdir) as st:
        model, _ = _load_parent(st, "finetune")
        data = _load_data(st)
        _check_input(model, data, "the upstream checkpoint")
        if model.num_classes != data.num_classes:
            log.info("new head: %d -> %d classes", model.num_classes, data.num_classes)
            model.reset_classifier(data.num_classes)
        model.to(st.device)
        loss, s = _cross_entropy(cfg), cfg.stage
        probe = {"linear": s.epochs, "linear_then_full": s.probe_epochs}.get(s.mode, 0)
        summary = _train(st, model, data, loss, Phase(probe, frozen_backbone=True)) if probe else {}
        if s.epochs > probe:
            phase = Phase(s.epochs - probe, first_epoch=probe + 1, best=summary or None)
            full = _train(st, model, data, loss, phase)
            summary = _merge(summary, full)
        return _finish(st, model, summary)


def distill(cfg: DictConfig, job_subdir: str | None = None) -> float | None:
    """Train the student ``model`` against the frozen upstream teacher with the ``kd`` loss."""
    with running(cfg, job_subdir) as st:
        teacher, teacher_stats = _load_parent(st, "distill")
        teacher.to(st.device).eval().requires_grad_(False)  # frozen: nothing puts it back
        if _channels_last(st):
            teacher.to(memory_format=torch.channels_last)
        data = _load_data(st)
        _check_input(teacher, data, "the teacher")
        if teacher.num_classes != data.num_classes:
            raise StageError(
                f"the teacher predicts {teacher.num_classes} classes but {cfg.dataset.name} has "
                f"{data.num_classes} here; finetune the teacher on this dataset first "
                f"(`distill-cli finetune dataset={cfg.dataset.name} ...`) or set stage.from"
            )
        n_params = count_params(teacher)
        teacher, normalisation = distillation.with_own_normalisation(
            teacher, teacher_stats, (data.info["mean"], data.info["std"])
        )
        student = _build(cfg, data).to(st.device)
        if data.streamed and cfg.kd.name == "crd":
            raise StageError(
                "kd=crd needs the images in memory (its memory bank is indexed by "
                "image), but this image folder streams; set dataset.stream=false"
            )
        use_cache = cfg.stage.teacher_cache and not data.streamed
        cache_at = cache_location(st, data.info, teacher_stats) if use_cache else None
        amp = runtime.amp_enabled(st.device, cfg.device.amp)
        goal = distillation.objective(cfg, teacher, student, data.train, data.shape, st.device,
                                      cache_at, student_amp=amp)  # fmt: skip
        val = _validation(st, data, goal.teacher)
        phase = Phase(distillation.stage_epochs(cfg))
        summary = _train(st, student, data, goal.loss_fn, phase, extra=goal.adapters, val=val)
        summary.update(teacher_params=n_params, teacher_normalisation=normalisation,
                       **_budget_spent(cfg, data), **goal.summary())  # fmt: skip
        st.manifest["teacher_prep"] = goal.teacher.info  # as prepared, checked, maybe fallen back
        if goal.cache is not None:
            summary["teacher_cache_hit_rate"] = save_cache(st, goal.cache)
        return _finish(st, student, summary)


STAGES: dict[str, Callable[[DictConfig, str | None], float | None]] = {
    "pretrain": pretrain, "finetune": finetune, "distill": distill, "eval": evaluate_run,
    "export": export_run,
}  # fmt: skip


# --- helpers shared by the stages -------------------------------------------------------------


def _load_data(st: Stage) -> Data:
    """Load the training split, carve validation and few-shot subsets, put both on the device."""
    d = st.cfg.dataset
    with distributed.main_first():  # under torchrun one process downloads
        split = st.load_dataset(d, train=True)
    x = convert(split.x, d.image_size, d.channels)
    num_classes = len(split.class_names)
    train_idx, val_idx = split_indices(
        split.y, num_classes, val_fraction=d.val_fraction, val_per_class=d.val_per_class,
        shots=d.shots, fraction=d.fraction, seed=d.subset_seed,
    )  # fmt: skip
    mean, std = channel_stats(x)  # of the whole training split: the same for every subset
    indices = {"train": train_idx.tolist(), "val": val_idx.tolist()}
    pools = _transfer_pools(st, x, indices)
    budget = _record_data(st, x, indices, num_classes, pools.record)
    make = _Loaders(st, Normalise(mean, std, _channels_last(st)), isinstance(x, ImageFiles))
    train = make.train(x[train_idx], split.y[train_idx], pools.images)
    val = make.eval(x[val_idx], split.y[val_idx]) if len(val_idx) else None
    fidelity = make.eval(pools.held_out, None) if pools.held_out is not None else None
    info = {"dataset": OmegaConf.to_container(d), "class_names": split.class_names,
            "mean": mean, "std": std, "budget": budget}  # fmt: skip
    # Under torchrun each process trains and validates on its rows of every batch.
    train, val = distributed.shard(train), distributed.shard(val, training=False)
    fidelity = distributed.shard(fidelity, training=False)
    return Data(train, val, num_classes, tuple(x.shape[1:]), info, make.streamed, fidelity)


class _Loaders:
    """The stage's loaders: one normalisation, device and seeds; the training set augmented."""

    def __init__(self, st: Stage, norm: Normalise, streamed: bool) -> None:
        d, s = st.cfg.dataset, st.cfg.stage
        self.stage, self.norm, self.device, self.streamed = s, norm, st.device, streamed
        self.augment = Augment(d.crop_padding, d.flip)
        self.order = Order(shuffle=True, seed=st.cfg.seed)
        # Per-image augmentation views, seeded by the data rather than the student's seed, let a
        # teacher cache serve every job of a sweep (distill only); a stream that cycles inside
        # an epoch (stage.transfer_epochs) needs them too.
        self.views = replace(self.augment, per_image_seed=d.subset_seed, views=s.get("aug_views"))
        cycles = bool(s.get("transfer_epochs"))
        self.per_image = bool(s.get("teacher_cache") or s.get("aug_views") or cycles)

    def train(self, x, y, unlabeled: torch.Tensor | None):
        """Labelled batches, joined by unlabelled ones when the transfer set has them."""
        s, streamed = self.stage, self.streamed
        augment = self.views if self.per_image and not streamed else self.augment
        order = replace(self.order, drop_last=len(x) > s.batch_size)
        kind = StreamLoader if streamed else BatchLoader
        labelled = kind(x, y, s.batch_size, self.norm, order=order, augment=augment,
                        device=self.device)  # fmt: skip
        if unlabeled is None:
            return labelled
        size = s.batch_size * s.unlabeled_ratio
        no_labels = torch.full((len(unlabeled),), distillation.UNLABELLED)
        order = replace(self.order, drop_last=len(unlabeled) > size)
        extra = BatchLoader(unlabeled, no_labels, size, self.norm, order=order,
                            augment=self.views, device=self.device)  # fmt: skip
        steps = _transfer_steps(s.get("transfer_epochs"), len(x) + len(unlabeled),
                                labelled.batch_size + size)  # fmt: skip
        return TransferLoader(labelled, extra, steps)

    def eval(self, x, y: torch.Tensor | None):
        """Unaugmented, unshuffled batches (``y`` None: unlabelled images, labels -1)."""
        if y is None:
            y = torch.full((len(x),), distillation.UNLABELLED)
        kind = StreamLoader if self.streamed else BatchLoader
        return kind(x, y, self.stage.eval_batch_size, self.norm, device=self.device)


def _transfer_steps(transfer_epochs: int | None, images: int, per_step: int) -> int | None:
    """Steps in one pass over the transfer set (``stage.transfer_epochs``); None: unset."""
    if not transfer_epochs:
        return None
    return max(1, math.ceil(images / per_step))


def _budget_spent(cfg: DictConfig, data: Data) -> dict:
    """What a distill stage's schedule came to: epochs as counted, steps in all."""
    return {"transfer_epochs": cfg.stage.get("transfer_epochs"),
            "steps": len(data.train) * distillation.stage_epochs(cfg)}  # fmt: skip


def _record_data(st: Stage, x, indices: dict, num_classes: int, transfer: dict) -> dict:
    """The data's manifest entry, indices.json and log lines; returns the labelled budget."""
    d = st.cfg.dataset
    n_train, n_val = len(indices["train"]), len(indices["val"])
    select = st.cfg.stage.get("select") or "val"
    if select == "fidelity" and not any(k.startswith("n_fidelity_") for k in transfer):
        raise StageError(
            "stage.select=fidelity needs unlabelled images to hold out; use "
            "stage.transfer_set=target, source or source+target, or stage.select=val"
        )
    budget = _budget(n_train, n_val, num_classes, select)
    st.manifest["data"] = {
        "dataset": d.name, "num_classes": num_classes, "n_train": n_train, "n_val": n_val,
        **budget, **transfer, "indices_file": "indices.json",
        "indices_sha256": st.write_json("indices.json", indices),
    }  # fmt: skip
    st.write_manifest()
    log.info("%s: %d training and %d validation images, %d classes, shape %s",
             d.name, n_train, n_val, num_classes, tuple(x.shape[1:]))  # fmt: skip
    log.info("labelled budget: %s per class for training, %s for validation; checkpoint "
             "selection: %s", budget["train_per_class"], budget["val_per_class"],
             _SELECTION_TEXT[budget["selection"]])  # fmt: skip
    if d.shots is not None and n_val > n_train:
        log.warning("the validation split holds %d labelled images, more than the %d trained on "
                    "(dataset.val_per_class=%s); the few-shot default holds out as many as the "
                    "shots", n_val, n_train, d.val_per_class)  # fmt: skip
    return budget


# How fit picks the checkpoint kept as best.pt, by what validation holds.
_SELECTION_TEXT = {"best_val": "the epoch with the best validation accuracy",
                   "fidelity": "the epoch with the best agreement with the teacher on held-out "
                               "unlabelled images (labels unused)",
                   "last": "the last epoch (nothing held out)"}  # fmt: skip


def _budget(n_train: int, n_val: int, num_classes: int, select: str = "val") -> dict:
    """The labelled images a stage trained and selected with, per class, and how it selected."""
    selection = "fidelity" if select == "fidelity" else "best_val" if n_val else "last"
    return {
        "train_per_class": labels_per_class(n_train, num_classes),
        "val_per_class": labels_per_class(n_val, num_classes),
        "selection": selection,
    }


class _Pools(NamedTuple):
    """The transfer set's unlabelled images, and those held out to measure fidelity."""

    images: torch.Tensor | None = None
    held_out: torch.Tensor | None = None
    record: dict = {}  # what the manifest's data entry says about them


def _transfer_pools(st: Stage, x, indices: dict) -> _Pools:
    """The unlabelled images ``stage.transfer_set`` adds, recorded in ``indices``."""
    s = st.cfg.stage
    if s.get("transfer_set", "labeled") == "labeled":
        return _Pools()
    if isinstance(x, ImageFiles):
        raise StageError(f"stage.transfer_set={s.transfer_set} needs the images in memory, "
                         "but this image folder streams; set dataset.stream=false")  # fmt: skip
    seen = torch.tensor(indices["train"] + indices["val"], dtype=torch.int64)
    with distributed.main_first():
        pools = distillation.unlabeled_images(st.cfg, x, seen, st.manifest["parent"]["path"])
    indices.update({f"unlabeled_{k}": v for k, v in pools.used.items()})
    indices.update({f"fidelity_{k}": v for k, v in pools.held_used.items()})
    record = {"transfer_set": s.transfer_set, "source_dataset": pools.source,
              "unlabeled_ratio": s.unlabeled_ratio,
              **{f"n_unlabeled_{k}": len(v) for k, v in pools.used.items()},
              **{f"n_fidelity_{k}": len(v) for k, v in pools.held_used.items()}}  # fmt: skip
    held = pools.held_out if len(pools.held_out) else None
    if not len(pools.images):
        log.warning("the transfer set adds no unlabelled images: training on the labelled subset")
        return _Pools(None, held, record)
    return _Pools(pools.images, held, record)


def _channels_last(st: Stage) -> bool:
    # Measured faster on the CPU too (bench/cpu_formats.py, docs/performance.md).
    return st.device.type in ("cuda", "cpu") and st.cfg.device.channels_last


def _build(cfg: DictConfig, data: Data) -> torch.nn.Module:
    """The configured model for this data; ``model.weights`` starts it from published weights."""
    c, h, _ = data.shape
    try:
        options = OmegaConf.to_container(cfg.model, resolve=True)
        del options["name"]  # weights (torchvision, timm), arch and kwargs (timm)
        return build_model(cfg.model.name, data.num_classes, c, h, **options)
    except ValueError as exc:  # unknown weights, failed download, bad file: one line already
        raise StageError(str(exc)) from None


def _load_parent(st: Stage, stage: str) -> tuple[torch.nn.Module, dict]:
    """Load the checkpoint a stage builds on and record it in the manifest.

    Returns:
        The model, and the normalisation it was trained with: ``{"mean", "std", "dataset"}``.
    """
    path, ckpt = st.read_parent(stage)
    model = ck.model_from_checkpoint(ckpt, path)
    stats = {"mean": ckpt.get("mean"), "std": ckpt.get("std"),
             "dataset": (ckpt.get("dataset") or {}).get("name")}  # fmt: skip
    log.info("%s from %s (%s, %d parameters)", "teacher" if stage == "distill" else "weights",
             path, model.config["name"], count_params(model))  # fmt: skip
    return model, stats


def _check_input(model: torch.nn.Module, data: Data, what: str) -> None:
    """Refuse data whose image shape differs from what the model was built for."""
    want = (model.config["in_channels"], model.config["image_size"], model.config["image_size"])
    if tuple(data.shape) != want:
        c, s = want[0], want[1]
        raise StageError(
            f"{what} expects {c}x{s}x{s} images but the dataset gives "
            f"{'x'.join(map(str, data.shape))}; add dataset.image_size={s} dataset.channels={c}"
        )


def _cross_entropy(cfg: DictConfig) -> Callable:
    smoothing = cfg.stage.label_smoothing

    def loss_fn(model, x, y):
        logits = model(x)
        return logits, {"loss": F.cross_entropy(logits.float(), y, label_smoothing=smoothing)}

    return loss_fn


def _train(st: Stage, model, data: Data, loss_fn, phase: Phase, *,
           extra: torch.nn.Module | None = None, val=None) -> dict:  # fmt: skip
    """Build the optimizer and schedule from the config and run :func:`training.fit`.

    When the stage resumes, the phase that holds the resume point continues from it; a phase
    that had finished before the stop is skipped. ``extra`` (distillation adapters) trains with
    the model; its state is kept in ``last.pt``'s training state only, never in the model.
    ``val`` replaces ``data.val`` (a :class:`selection.Validation` that measures fidelity too).
    """
    s = st.cfg.stage
    resume, done = _resume_point(st, model, extra, phase)
    if done is not None:
        return done
    optimizer = _optimizer(st.cfg.optimizer, model, extra, phase.frozen_backbone, s)
    o, steps = st.cfg.optimizer, len(data.train) * phase.epochs
    scheduler = build_scheduler(optimizer, steps, o.schedule, len(data.train) * o.warmup_epochs,
                                list(o.milestones), o.gamma)  # fmt: skip
    total = s.epochs if s.name == "finetune" else phase.first_epoch + phase.epochs - 1
    if phase.frozen_backbone:
        log.info("linear probe: backbone frozen for %d epochs", phase.epochs)
    step = Step(_runner(st, model, extra), loss_fn, optimizer, scheduler, st.amp(),
                _scaler(st), o.get("clip_grad_norm"), phase.frozen_backbone)  # fmt: skip
    schedule = Schedule(phase.epochs, phase.first_epoch, total, s.val_every)
    saving = Checkpointing(_saver(st, model, data, extra), s.save_every_s, resume, phase.best)
    report = Reporting(st.folder / "metrics.jsonl", search.epoch_hook(st.tracker.log_epoch))
    return fit(step, data.train, data.val if val is None else val, schedule, saving, report)


def _resume_point(st: Stage, model, extra, phase: Phase) -> tuple[dict | None, dict | None]:
    """(the training state to continue from, or None; the summary of a finished phase, or None).

    Loads the resumed weights into ``model`` and ``extra``. A stop exactly at the end of the
    previous phase starts this one afresh, as then (its best carried in ``phase.best``).
    """
    if st.resume is None:
        return None, None
    state = st.resume["train_state"]
    done = state["epoch"] if state["step"] == 0 else state["epoch"] - 1
    if done >= phase.first_epoch + phase.epochs - 1:  # this phase finished before the stop
        return None, {k: state[k] for k in ("best_epoch", "best_val_acc", "last_val_acc")}
    model.load_state_dict(st.resume["state_dict"])
    if extra is not None and state.get("extra") is not None:
        extra.load_state_dict(state["extra"])
    resume = None
    if done >= phase.first_epoch or state["step"]:
        resume = state
    else:  # stopped exactly at the end of the previous phase: a fresh optimizer, as then
        set_rng(state["rng"])
        phase.best = {"best_epoch": state["best_epoch"], "best_val_acc": state["best_val_acc"]}
    st.resume = None
    return resume, None


def _optimizer(o: DictConfig, model, extra, frozen_backbone: bool, s: DictConfig):
    """The optimizer over the backbone (``stage.backbone_lr_mult``), the head and ``extra``."""
    model.requires_grad_(True)
    if frozen_backbone:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    head = [p for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.") and p.requires_grad]
    mult = s.get("backbone_lr_mult", 1.0)
    groups = [{"params": body, "lr": o.lr * mult}, {"params": head, "lr": o.lr}]
    if extra is not None:
        groups.append({"params": list(extra.parameters()), "lr": o.lr})
    return build_optimizer(
        groups, o.name, o.lr, o.weight_decay, o.get("momentum", 0.9), o.get("nesterov", False),
        tuple(o.get("betas", (0.9, 0.999))),
    )  # fmt: skip


def _runner(st: Stage, model, extra) -> torch.nn.Module:
    """What the step runs: channels-last, DDP under torchrun, compiled with device.compile."""
    if _channels_last(st):
        model.to(memory_format=torch.channels_last)
    runner = distributed.replicate(model, extra)  # DDP under torchrun, else the model itself
    return torch.compile(runner) if st.cfg.device.compile else runner  # checkpoints: the plain one


def _scaler(st: Stage) -> torch.amp.GradScaler | None:
    """The float16 gradient scaler (CUDA mixed precision in float16), else None."""
    d = st.cfg.device
    amp_on = runtime.amp_enabled(st.device, d.amp)  # device.amp=null: the device's default
    fp16 = st.device.type == "cuda" and amp_on and d.amp_dtype == "float16"
    return torch.amp.GradScaler("cuda") if fp16 else None


def _saver(st: Stage, model, data: Data, extra) -> Callable:
    """The save function for :func:`training.fit`: a checkpoint, its hash in the manifest."""

    def save(name: str, epoch: int, val_acc: float | None, train_state: dict | None,
             weights: dict | None) -> None:  # fmt: skip
        path = st.folder / f"{name}.pt"
        previous = st.manifest["checkpoints"].get(name, {}).get("sha256")

        def record(digest: str) -> None:  # before the rename: a crash leaves a known file
            entry = {"file": path.name, "epoch": epoch, "sha256": digest}
            st.manifest["checkpoints"][name] = {**entry, "previous_sha256": previous}
            st.write_manifest()

        if train_state and extra is not None:
            train_state = {**train_state, "extra": extra.state_dict()}
        resumable = {"train_state": train_state} if train_state else {}
        ck.save_checkpoint(
            path, model, weights, on_digest=record, stage=st.cfg.stage.name,
            tag=st.cfg.tag or st.cfg.stage.name, run=st.run_dir.name, epoch=epoch,
            val_acc=val_acc, seed=st.cfg.seed, **data.info, **resumable,
        )  # fmt: skip

    return save


def _validation(st: Stage, data: Data, teacher) -> Validation | None:
    """What a distill stage validates on: labels, and the fidelity on held-out images if any."""
    if data.fidelity is None:
        return None
    select = st.cfg.stage.get("select") or "val"
    if data.val is None and select == "val":
        return None  # nothing labelled held out: the last epoch is kept, as without fidelity
    return Validation(data.val, Fidelity(data.fidelity, teacher), select)


def _merge(first: dict, second: dict) -> dict:
    """Combine the summaries of a linear probe and the finetune after it (which knows the best)."""
    merged = dict(second)
    times = [d.get("train_time_s") for d in (first, second) if d.get("train_time_s") is not None]
    merged["train_time_s"] = round(sum(times), 3) if times else None
    return merged


def _finish(st: Stage, model, summary: dict) -> float | None:
    """The stage's final metrics: what was trained on what, and how it went."""
    summary = {
        "stage": st.cfg.stage.name, "model": display_name(model.config),
        "params": count_params(model),
        "dataset": st.cfg.dataset.name, "n_train": st.manifest["data"]["n_train"],
        "n_val": st.manifest["data"]["n_val"],
        **{k: st.manifest["data"][k] for k in ("train_per_class", "val_per_class", "selection")},
        "epochs": st.cfg.stage.epochs, "seed": st.cfg.seed, **summary,
    }  # fmt: skip
    return finish(st, summary)


def cache_location(st: Stage, info: dict, teacher_stats: dict) -> tuple[Path, dict]:
    """Where the teacher cache of this stage lives and what its key hashes.

    The key holds both normalisations: the batches' (the student's) and the teacher's own.
    """
    cfg = st.cfg
    parts = {
        "teacher_sha256": st.manifest["parent"]["sha256"],
        "indices_sha256": st.manifest["data"]["indices_sha256"],
        "dataset": OmegaConf.to_container(cfg.dataset), "mean": info["mean"], "std": info["std"],
        "teacher_mean": teacher_stats["mean"], "teacher_std": teacher_stats["std"],
        "aug_views": cfg.stage.aug_views, "device": st.device.type,
        "amp": [cfg.device.amp, cfg.device.amp_dtype], "channels_last": cfg.device.channels_last,
        "torch": torch.__version__,
    }  # fmt: skip
    return st.run_dir / ".teacher_cache", parts


def save_cache(st: Stage, cache: TeacherCache) -> float | None:
    """Write the cache for later jobs, record its statistics; returns the hit rate.

    Under torchrun process 0 writes what it holds: the entries it loaded and those of its rows.
    """
    if st.main:
        cache.save(rundir.atomic_write)
    st.manifest["teacher_cache"] = cache.stats()
    st.write_manifest()
    log.info("teacher cache: %d hits, %d misses, %d entries loaded from %s", cache.hits,
             cache.misses, cache.loaded, cache.path)  # fmt: skip
    return cache.stats()["hit_rate"]
