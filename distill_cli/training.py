"""The shared fit loop, optimizers, learning-rate schedules and evaluation.

Every training stage (``distill-cli pretrain|finetune|distill``) calls :func:`fit` with a loss
function; the stage decides what the loss is, this module decides how an epoch runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

from distill_cli import distributed
from distill_cli.console import StageProgress
from distill_cli.runtime import StopRequest
from distill_cli.selection import Validation, as_validation, evaluate

__all__ = ["Checkpointing", "Interrupted", "Reporting", "Saver", "Schedule", "Step",
           "TrainingError", "build_optimizer", "build_scheduler", "clip_gradients", "evaluate",
           "fit", "lr_factor", "set_rng", "weights_of"]  # fmt: skip

log = logging.getLogger("distill_cli")

# (model, images, labels) -> (logits, {"loss": total, other named terms...})
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
# (name "best" | "last", epoch, validation accuracy or None, training state or None, weights or
# None for the model's current ones) -> None
SaveFn = Callable[[str, int, float | None, dict | None, dict | None], None]


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss is no longer finite); the message is one line."""


def build_optimizer(
    groups: Iterable[dict],
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW over parameter groups (a group may carry its own ``lr``).

    The update runs as one fused kernel over all parameters where this torch has one for their
    device (the same arithmetic as the per-parameter loop, up to float rounding; 5x faster on the
    CPU for the seed's CNN), else as torch's multi-tensor loop.
    """
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        kwargs = {"momentum": momentum, "nesterov": nesterov and momentum > 0}
        cls = torch.optim.SGD
    elif name in ("adam", "adamw"):
        kwargs = {"betas": betas}
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    else:
        raise ValueError(f"unknown optimizer '{name}'; valid: sgd, adam, adamw")
    kwargs |= {"lr": lr, "weight_decay": weight_decay}
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for these parameters
        return cls(groups, foreach=True, **kwargs)


def lr_factor(
    step: int, total: int, schedule: str, warmup: int, milestones: list[float], gamma: float
) -> float:
    """Multiplier of the peak learning rate at ``step`` (per-step schedules with linear warm-up)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(progress >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule '{schedule}'; valid: cosine, step, constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, schedule: str, warmup_steps: int,
    milestones: list[float], gamma: float,
) -> torch.optim.lr_scheduler.LambdaLR:  # fmt: skip
    """A per-step LambdaLR following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, schedule, warmup_steps, milestones, gamma)
    )


def set_train_mode(model: torch.nn.Module, frozen_backbone: bool) -> None:
    """Train mode, except a frozen backbone stays in eval mode (its BatchNorm stats too)."""
    model.train(not frozen_backbone)
    if frozen_backbone:
        model.head.train()


@dataclass
class Tally:
    """Running sums of one epoch; saved on interruption so that the epoch resumes exactly."""

    lr: float
    step: int = 0
    count: int = 0
    correct: int = 0
    labeled: int = 0  # samples with a label (>= 0); unlabelled transfer images count in `count`
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)


class Interrupted(Exception):
    """Training stopped on a signal after saving a resumable ``last.pt``.

    ``status`` is what the stage folder's manifest records.
    """

    status = "interrupted"


class _Stopped(Exception):
    """Raised between two steps when a stop was requested."""


@dataclass
class Step:
    """One optimisation step: the model, its loss, the optimizer and how gradients are taken.

    Attributes:
        model: What trains (possibly wrapped by DDP or torch.compile).
        loss_fn: ``(model, x, y) -> (logits, {"loss": total, other named terms...})``.
        optimizer: The optimizer.
        scheduler: A per-step learning-rate schedule.
        amp: The autocast context, or None.
        scaler: Scales float16 losses (CUDA mixed precision), or None.
        clip_grad_norm: Caps the L2 norm of all gradients (see :func:`clip_gradients`), or None.
        frozen_backbone: Keep all but the head in eval mode (a linear probe).
    """

    model: torch.nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: contextlib.AbstractContextManager | None = None
    scaler: torch.amp.GradScaler | None = None
    clip_grad_norm: float | None = None
    frozen_backbone: bool = False


@dataclass
class Schedule:
    """Which epochs run and when they are validated.

    Attributes:
        epochs: How many epochs this call trains.
        first_epoch: The number of the first (a phase after a linear probe starts later).
        total_epochs: The stage's epoch count, shown by the progress bar; None: this call's end.
        val_every: Validate every that many epochs, and after the last one.
    """

    epochs: int
    first_epoch: int = 1
    total_epochs: int | None = None
    val_every: int = 1

    @property
    def end(self) -> int:
        """One past the last epoch."""
        return self.first_epoch + self.epochs


@dataclass
class Checkpointing:
    """How checkpoints are written and what an earlier run left to continue from.

    Attributes:
        save: Writes ``best.pt`` / ``last.pt`` (see :data:`SaveFn`).
        every_s: Space the writes by at least this many seconds (see :class:`Saver`).
        resume: A saved training state to continue exactly, mid-epoch too; or None.
        best: The best epoch and accuracy of an earlier phase (a linear probe); or None.
    """

    save: SaveFn
    every_s: float = 0.0
    resume: dict | None = None
    best: dict | None = None


@dataclass
class Reporting:
    """Where each epoch's metrics row goes: ``metrics_file``, then ``on_epoch`` (a tracker)."""

    metrics_file: Path
    on_epoch: Callable[[dict], None] | None = None


@dataclass
class _Epoch:
    """What one epoch's loop reads besides the step: its number, the progress bar, the stop."""

    number: int
    total: int
    progress: StageProgress
    stop: StopRequest


def fit(
    step: Step,
    train: Iterable,
    val: Iterable | Validation | None,
    schedule: Schedule,
    checkpoints: Checkpointing,
    report: Reporting,
) -> dict:
    """Train ``schedule``'s epochs; validate, log, checkpoint.

    ``val`` holds labelled batches, or a :class:`selection.Validation` that also measures the
    fidelity to the teacher and says which score picks ``best.pt``. ``last.pt`` carries the
    training state (optimizer, schedule, RNG, best so far); a resume continues exactly where
    it stopped, mid-epoch too. SIGINT/SIGTERM stop between two steps, save that point and raise
    :class:`Interrupted`. Under torchrun (see :mod:`distributed`) the epoch's sums and the
    validation are reduced over the processes, every process stops at the same step, and
    process 0 alone saves and writes the metrics.

    Returns:
        Summary with ``best_epoch``, ``best_val_acc``, ``last_val_acc``, ``train_time_s`` and
        ``images_per_sec`` (and ``selection`` when more than one criterion was measured).
        Without a validation set the last epoch counts as the best.
    """
    validation, main = as_validation(val), distributed.is_main()
    state = _fit_state(checkpoints.best or {})
    start, tally = schedule.first_epoch, None
    if checkpoints.resume is not None:
        start, tally = _resume(checkpoints.resume, step, state, main)
    steps = len(train) * (schedule.end - start) - (tally.step if tally else 0)  # type: ignore[arg-type]
    saver = Saver(checkpoints.save if main else None, checkpoints.every_s)
    with StageProgress(steps, "training", main) as progress, StopRequest() as stop:
        for number in range(start, schedule.end):
            epoch = _Epoch(number, schedule.total_epochs or schedule.end - 1, progress, stop)
            tally = _train_or_stop(step, train, epoch, tally, saver, state)
            row = _row(number, tally)
            state["seen"] += tally.count
            state["train_time"] += tally.seconds
            distributed.average_buffers(step.model)
            last = number == schedule.end - 1
            if validation is not None and (number % schedule.val_every == 0 or last):
                row.update(validation(step.model, step.amp))
            # The row first, then best, then last: last.pt marks what is done, and a resume drops
            # rows past its epoch, so a crash anywhere in between repeats the epoch identically.
            if main:
                _append_row(report.metrics_file, row, report.on_epoch)
            _select(validation, row, state, saver, step.model)
            stopping = distributed.any_rank(stop.signal is not None)
            if stopping or last or saver.due():
                saver.flush(number, state["last_val_acc"], _train_state(step, state, number, None))
            log.info(_epoch_line(row))
            tally = None
            if stopping:
                raise Interrupted(f"stopped by {stop.signal} after epoch {number}")
    return _summary(state, validation)


def _train_or_stop(step: Step, train, epoch: _Epoch, tally: Tally | None, saver: Saver,
                   state: dict) -> Tally:  # fmt: skip
    """One epoch's training; on a stop signal, save the exact point and raise Interrupted."""
    tally = tally or Tally(lr=step.optimizer.param_groups[-1]["lr"])
    try:
        _train_epoch(step, train, epoch, tally)
    except _Stopped:
        tally = _reduced(tally)
        saver.flush(epoch.number, state["last_val_acc"],
                    _train_state(step, state, epoch.number, tally))  # fmt: skip
        raise Interrupted(
            f"stopped by {epoch.stop.signal} at epoch {epoch.number}, step {tally.step}"
        ) from None
    except TrainingError:
        saver.flush_best()  # the best epoch so far is kept; last.pt stays the resume point
        raise
    return _reduced(tally)


def _select(validation: Validation | None, row: dict, state: dict, saver: Saver,
            model: torch.nn.Module) -> None:  # fmt: skip
    """Keep the epoch as ``best`` when the selection criterion improved (always without one).

    The other measured criterion's best is kept too, as ``best_<criterion>.pt``, so that both
    choices can be evaluated.
    """
    if "val_acc" in row:
        state["last_val_acc"] = row["val_acc"]
    if validation is None:
        state.update(best_epoch=row["epoch"], best_val_acc=state["last_val_acc"])
        saver.best(model, row["epoch"], state["last_val_acc"])
        return
    if not any(k in row for k in ("val_acc", "fid_agree")):
        return  # not validated this epoch
    for criterion in validation.improved(row, state["picks"]):
        if criterion == validation.select:
            state.update(best_epoch=row["epoch"], best_val_acc=row.get("val_acc"))
            saver.best(model, row["epoch"], row.get("val_acc"))
        else:
            saver.best(model, row["epoch"], row.get("val_acc"), name=f"best_{criterion}")


# --- fit's policies: resume, training state, the metrics file, the summary ---------------------


def _fit_state(best: dict) -> dict:
    """What fit carries across epochs and into last.pt: the best so far and the throughput.

    ``picks`` holds each selection criterion's best epoch so far (see ``selection``).
    """
    picks = {}
    if best.get("best_val_acc") is not None:
        picks["val"] = {"epoch": best["best_epoch"], "val_acc": best["best_val_acc"],
                        "score": [best["best_val_acc"]]}  # fmt: skip
    return {"best_epoch": best.get("best_epoch"), "best_val_acc": best.get("best_val_acc"),
            "last_val_acc": None, "seen": 0, "train_time": 0.0, "picks": picks}  # fmt: skip


def _resume(resume: dict, step: Step, state: dict, main: bool) -> tuple[int, Tally | None]:
    """Restore a saved training state; return the epoch to continue and its tally if mid-epoch."""
    step.optimizer.load_state_dict(resume["optimizer"])
    step.scheduler.load_state_dict(resume["scheduler"])
    set_rng(resume["rng"])
    if step.scaler is not None and resume.get("scaler"):
        step.scaler.load_state_dict(resume["scaler"])
    state.update({k: resume.get(k, state[k]) for k in state})  # picks: absent before selection
    start = resume["epoch"] if resume["step"] else resume["epoch"] + 1
    tally = Tally(**resume["tally"]) if resume["step"] else None
    if tally is not None and not main:  # the saved sums are every process's: count them once
        tally = Tally(tally.lr, tally.step, sums=dict.fromkeys(tally.sums, 0.0))
    return start, tally


def _train_state(step: Step, state: dict, epoch: int, tally: Tally | None) -> dict:
    """The training state last.pt carries: enough to continue exactly, mid-epoch too."""
    return {
        "epoch": epoch, "step": tally.step if tally else 0,
        "tally": asdict(tally) if tally else None, "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(), "rng": _get_rng(),
        "scaler": step.scaler.state_dict() if step.scaler is not None else None, **state,
    }  # fmt: skip


def _append_row(metrics_file: Path, row: dict, on_epoch: Callable[[dict], None] | None) -> None:
    """Add the epoch's row to metrics.jsonl, then hand it to the tracker."""
    with open(metrics_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if on_epoch is not None:
        on_epoch(row)


def _summary(state: dict, validation: Validation | None) -> dict:
    """What fit returns: the best and last validation accuracy, time and throughput.

    With more than one criterion measured, ``selection`` gives the epoch each would keep.
    """
    summary = {
        "best_epoch": state["best_epoch"],
        "best_val_acc": state["best_val_acc"],
        "last_val_acc": state["last_val_acc"],
        "train_time_s": round(state["train_time"], 3),
        "images_per_sec": round(state["seen"] / state["train_time"], 1)
        if state["train_time"] > 0
        else None,
    }
    if validation is not None and len(validation.criteria) > 1:
        summary["select"] = validation.select
        summary["selection"] = {c: {k: v for k, v in pick.items() if k != "score"}
                                for c, pick in state["picks"].items()}  # fmt: skip
    return summary


class Saver:
    """When ``best.pt`` and ``last.pt`` reach the disk: at most every ``interval_s`` seconds.

    A new best epoch is copied in memory and written with the next ``last.pt``, so the two files
    always agree on the best epoch. ``fit`` flushes after the last epoch and on a stop, so
    Ctrl-C and SIGTERM resume exactly; a SIGKILL loses at most ``interval_s`` seconds plus the
    epoch in progress. ``save=None`` (torchrun's other processes) writes nothing.
    """

    def __init__(self, save: SaveFn | None, interval_s: float) -> None:
        self.save, self.interval_s = save, interval_s
        self.last_write = time.monotonic()
        # best epochs not yet written, by checkpoint name: (epoch, val_acc, weights)
        self.pending: dict[str, tuple[int, float | None, dict]] = {}

    def best(self, model: torch.nn.Module, epoch: int, val_acc: float | None,
             name: str = "best") -> None:  # fmt: skip
        """Remember the model's weights as ``name``'s best so far (written at the next flush)."""
        if self.save is not None:
            self.pending[name] = (epoch, val_acc, weights_of(model))

    def due(self) -> bool:
        """Whether the interval since the last write has passed."""
        return time.monotonic() - self.last_write >= self.interval_s

    def flush_best(self) -> None:
        """Write the pending best checkpoints, if any."""
        if self.save is not None:
            for name, (epoch, val_acc, weights) in self.pending.items():
                self.save(name, epoch, val_acc, None, weights)
            self.pending = {}

    def flush(self, epoch: int, val_acc: float | None, train_state: dict) -> None:
        """Write the pending best, then ``last.pt`` with the training state to resume from."""
        if self.save is None:
            return
        self.flush_best()
        self.save("last", epoch, val_acc, train_state, None)
        self.last_write = time.monotonic()


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the plain module's weights (unwrapped from torch.compile and DDP)."""
    state = distributed.unwrap(model).state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _get_rng() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng(rng: dict) -> None:
    """Restore the random generators saved in a training state."""
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Scales all trained gradients down to a joint L2 norm of at most ``max_norm``.

    Returns the norm before clipping, logged per epoch as ``train_grad_norm``.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()


def _train_epoch(step: Step, train, epoch: _Epoch, tally: Tally) -> None:
    """One pass over the training batches, accumulating into ``tally``."""
    set_train_mode(step.model, step.frozen_backbone)
    if hasattr(train, "set_epoch"):
        train.set_epoch(epoch.number)
    done = tally.step  # resumed mid-epoch: these batches were trained on before the stop
    tick = time.perf_counter()
    for i, (x, y) in enumerate(_labelled(train, "data"), start=1):
        if i <= done:
            tick = time.perf_counter()
            continue
        logits, parts = _step(step, x, y, f"epoch {epoch.number}, step {i}")
        step.scheduler.step()
        _tally(tally, parts, logits, y)
        tally.step = i
        now = time.perf_counter()  # the time since the last step: batch preparation included
        tally.seconds += now - tick
        tick = now
        epoch.progress.update(epoch.number, epoch.total, tally.sums["loss"] / tally.count,
                              100 * tally.correct / max(tally.labeled, 1),
                              tally.count / tally.seconds)  # fmt: skip
        if distributed.any_rank(epoch.stop.signal is not None):
            raise _Stopped


def _labelled(batches: Iterable, label: str) -> Iterable:
    """``batches``, each fetch under a profiler label (free when no profiler runs)."""
    it = iter(batches)
    while True:
        with record_function(label):
            item = next(it, None)
        if item is None:
            return
        yield item


@record_function("bookkeeping")
def _tally(tally: Tally, parts: dict, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Adds one step's loss parts, correct and labelled counts to the epoch's sums."""
    for name, value in parts.items():
        tally.sums[name] = tally.sums.get(name, 0.0) + value.item() * len(y)
    tally.correct += (logits.argmax(dim=1) == y).sum().item()  # -1 (no label) never matches
    tally.labeled += (y >= 0).sum().item()
    tally.count += len(y)


def _step(step: Step, x, y, where: str) -> tuple[torch.Tensor, dict]:
    """One optimizer step under autocast; float16 losses scaled, gradients clipped if asked.

    Raises:
        TrainingError: the loss is not finite, in this process or another (before the backward).
    """
    with step.amp or contextlib.nullcontext(), record_function("forward"):
        logits, parts = step.loss_fn(step.model, x, y)
    loss = parts["loss"]
    finite = bool(torch.isfinite(loss))
    if distributed.any_rank(not finite):  # every process stops here, before the backward
        value = loss.item() if not finite else "not finite in another process"
        raise TrainingError(
            f"the loss became {value} at {where}; the last good "
            "checkpoint is kept. Usual causes: a learning rate too high (lower optimizer.lr), "
            "or float16 overflow (device.amp_dtype=bfloat16 or device.amp=false)"
        )
    optimizer, scaler, clip = step.optimizer, step.scaler, step.clip_grad_norm
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # float16: scale the loss so small gradients do not vanish
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
            parts["grad_norm"] = clip_gradients(optimizer, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        with record_function("backward"):
            loss.backward()
        if clip is not None:
            parts["grad_norm"] = clip_gradients(optimizer, clip)
        with record_function("optimizer"):
            optimizer.step()
    return logits, parts


def _reduced(tally: Tally) -> Tally:
    """The tally summed over the processes (time: the slowest one's); itself in one process."""
    if distributed.world() == 1:
        return tally
    counts = [tally.count, tally.correct, tally.labeled, *tally.sums.values()]
    total = distributed.all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
    count, correct, labeled = (round(v) for v in total[:3])
    sums = dict(zip(tally.sums, total[3:], strict=True))
    seconds = distributed.all_reduce_max(tally.seconds)
    return Tally(tally.lr, tally.step, count, correct, labeled, seconds, sums)


def _row(epoch: int, tally: Tally) -> dict:
    """The metrics row of a finished epoch."""
    row = {"epoch": epoch, "lr": tally.lr, "epoch_time_s": round(tally.seconds, 3)}
    row.update({f"train_{k}": v / max(tally.count, 1) for k, v in tally.sums.items()})
    row["train_acc"] = 100 * tally.correct / max(tally.labeled, 1)
    row["images"] = tally.count  # trained on in this epoch, by all processes together
    row["images_per_sec"] = round(tally.count / tally.seconds, 1) if tally.seconds > 0 else None
    return row


def _epoch_line(row: dict) -> str:
    val = f"  val {row['val_acc']:.2f}%" if "val_acc" in row else ""
    return (
        f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%{val}"
        f"  lr {row['lr']:.3g}  {row['images_per_sec'] or 0:,.0f} img/s"
    )
