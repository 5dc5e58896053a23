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
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_cli import distributed
from distill_cli.console import StageProgress
from distill_cli.runtime import StopRequest

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
    """SGD, Adam or AdamW over parameter groups (a group may carry its own ``lr``)."""
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
            weight_decay=weight_decay,
        )  # fmt: skip
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; valid: sgd, adam, adamw")


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
    """Training stopped on a signal after saving a resumable ``last.pt``."""


class _Stopped(Exception):
    """Raised between two steps when a stop was requested."""


def fit(
    model: torch.nn.Module,
    train: Iterable,
    val: Iterable | None,
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epochs: int,
    save: SaveFn,
    metrics_file: Path,
    amp: contextlib.AbstractContextManager | None = None,
    frozen_backbone: bool = False,
    first_epoch: int = 1,
    total_epochs: int | None = None,
    best: dict | None = None,
    resume: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    clip_grad_norm: float | None = None,
    val_every: int = 1,
    save_every_s: float = 0.0,
) -> dict:
    """Train epochs ``first_epoch`` to ``first_epoch + epochs - 1``; validate, log, checkpoint.

    ``scaler`` scales float16 losses (CUDA mixed precision); ``best`` carries the best epoch
    and accuracy of an earlier phase (a linear probe).
    ``last.pt`` carries the training state (optimizer, schedule, RNG, best so
    far); ``resume`` takes such a state and continues exactly where it stopped, mid-epoch too.
    SIGINT/SIGTERM stop between two steps, save that point and raise :class:`Interrupted`.
    ``on_epoch`` gets each epoch's metrics row once it is in ``metrics_file`` (a tracker).
    ``clip_grad_norm`` caps the L2 norm of all gradients at each step (see :func:`clip_gradients`).
    ``val_every`` validates every that many epochs and after the last one. ``save_every_s``
    spaces the checkpoint writes (see :class:`Saver`): 0 writes after every epoch.
    Under torchrun (see :mod:`distributed`) the epoch's sums and the validation are reduced
    over the processes, every process stops at the same step, and process 0 alone calls
    ``save``, ``on_epoch`` and writes ``metrics_file``.

    Returns:
        Summary with ``best_epoch``, ``best_val_acc``, ``last_val_acc``, ``train_time_s`` and
        ``images_per_sec``. Without a validation set the last epoch counts as the best.
    """
    end = first_epoch + epochs
    total_epochs = total_epochs or end - 1
    main = distributed.is_main()
    state = _fit_state(best or {})
    start, tally = first_epoch, None
    if resume is not None:
        start, tally = _resume(resume, optimizer, scheduler, scaler, state, main)
    train_state = partial(_train_state, optimizer, scheduler, scaler, state)
    steps = len(train) * (end - start) - (tally.step if tally else 0)  # type: ignore[arg-type]
    saver = Saver(save if main else None, save_every_s)
    with StageProgress(steps, "training", main) as progress, StopRequest() as stop:
        for epoch in range(start, end):
            tally = tally or Tally(lr=optimizer.param_groups[-1]["lr"])
            try:
                _train_epoch(model, train, loss_fn, optimizer, scheduler, amp, frozen_backbone,
                             progress, epoch, total_epochs, tally, stop, scaler,
                             clip_grad_norm)  # fmt: skip
            except _Stopped:
                tally = _reduced(tally)
                saver.flush(epoch, state["last_val_acc"], train_state(epoch, tally))
                raise Interrupted(
                    f"stopped by {stop.signal} at epoch {epoch}, step {tally.step}"
                ) from None
            except TrainingError:
                saver.flush_best()  # the best epoch so far is kept; last.pt stays the resume point
                raise
            tally = _reduced(tally)
            row = _row(epoch, tally)
            state["seen"] += tally.count
            state["train_time"] += tally.seconds
            distributed.average_buffers(model)
            validated = val is not None and (epoch % val_every == 0 or epoch == end - 1)
            if validated:
                _validate(model, val, amp, row, state)
            # The row first, then best, then last: last.pt marks what is done, and a resume drops
            # rows past its epoch, so a crash anywhere in between repeats the epoch identically.
            if main:
                _append_row(metrics_file, row, on_epoch)
            if val is None or (validated and _improved(state)):
                state.update(best_epoch=epoch, best_val_acc=state["last_val_acc"])
                saver.best(model, epoch, state["last_val_acc"])
            stopping = distributed.any_rank(stop.signal is not None)
            if stopping or epoch == end - 1 or saver.due():
                saver.flush(epoch, state["last_val_acc"], train_state(epoch, None))
            log.info(_epoch_line(row))
            tally = None
            if stopping:
                raise Interrupted(f"stopped by {stop.signal} after epoch {epoch}")
    return _summary(state)


# --- fit's policies: resume, training state, validation, the metrics file, the summary --------


def _fit_state(best: dict) -> dict:
    """What fit carries across epochs and into last.pt: the best so far and the throughput."""
    return {"best_epoch": best.get("best_epoch"), "best_val_acc": best.get("best_val_acc"),
            "last_val_acc": None, "seen": 0, "train_time": 0.0}  # fmt: skip


def _resume(
    resume: dict, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None, state: dict, main: bool,
) -> tuple[int, Tally | None]:  # fmt: skip
    """Restore a saved training state; return the epoch to continue and its tally if mid-epoch."""
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    set_rng(resume["rng"])
    if scaler is not None and resume.get("scaler"):
        scaler.load_state_dict(resume["scaler"])
    state.update({k: resume[k] for k in state})
    start = resume["epoch"] if resume["step"] else resume["epoch"] + 1
    tally = Tally(**resume["tally"]) if resume["step"] else None
    if tally is not None and not main:  # the saved sums are every process's: count them once
        tally = Tally(tally.lr, tally.step, sums=dict.fromkeys(tally.sums, 0.0))
    return start, tally


def _train_state(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None, state: dict, epoch: int, tally: Tally | None,
) -> dict:  # fmt: skip
    """The training state last.pt carries: enough to continue exactly, mid-epoch too."""
    return {
        "epoch": epoch, "step": tally.step if tally else 0,
        "tally": asdict(tally) if tally else None, "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": _get_rng(),
        "scaler": scaler.state_dict() if scaler is not None else None, **state,
    }  # fmt: skip


def _validate(
    model: torch.nn.Module, val: Iterable, amp: contextlib.AbstractContextManager | None,
    row: dict, state: dict,
) -> None:  # fmt: skip
    """Score the validation set into the epoch's row and the fit state."""
    scores = evaluate(model, val, amp)
    row.update(val_acc=scores["top1"], val_top5=scores["top5"], val_nll=scores["nll"])
    state["last_val_acc"] = scores["top1"]


def _improved(state: dict) -> bool:
    """Whether the epoch just validated beats the best so far."""
    return state["best_val_acc"] is None or state["last_val_acc"] > state["best_val_acc"]


def _append_row(metrics_file: Path, row: dict, on_epoch: Callable[[dict], None] | None) -> None:
    """Add the epoch's row to metrics.jsonl, then hand it to the tracker."""
    with open(metrics_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if on_epoch is not None:
        on_epoch(row)


def _summary(state: dict) -> dict:
    """What fit returns: the best and last validation accuracy, time and throughput."""
    return {
        "best_epoch": state["best_epoch"],
        "best_val_acc": state["best_val_acc"],
        "last_val_acc": state["last_val_acc"],
        "train_time_s": round(state["train_time"], 3),
        "images_per_sec": round(state["seen"] / state["train_time"], 1)
        if state["train_time"] > 0
        else None,
    }


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
        self.pending: tuple[int, float | None, dict] | None = None  # best epoch not yet written

    def best(self, model: torch.nn.Module, epoch: int, val_acc: float | None) -> None:
        """Remember the model's weights as the best so far (written at the next flush)."""
        if self.save is not None:
            self.pending = (epoch, val_acc, weights_of(model))

    def due(self) -> bool:
        """Whether the interval since the last write has passed."""
        return time.monotonic() - self.last_write >= self.interval_s

    def flush_best(self) -> None:
        """Write the pending best checkpoint, if any."""
        if self.save is not None and self.pending is not None:
            epoch, val_acc, weights = self.pending
            self.save("best", epoch, val_acc, None, weights)
            self.pending = None

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


def _train_epoch(
    model, train, loss_fn, optimizer, scheduler, amp, frozen_backbone, progress, epoch, epochs,
    tally: Tally, stop: StopRequest, scaler: torch.amp.GradScaler | None = None,
    clip_grad_norm: float | None = None,
) -> None:  # fmt: skip
    """One pass over the training batches, accumulating into ``tally``."""
    set_train_mode(model, frozen_backbone)
    if hasattr(train, "set_epoch"):
        train.set_epoch(epoch)
    done = tally.step  # resumed mid-epoch: these batches were trained on before the stop
    tick = time.perf_counter()
    for step, (x, y) in enumerate(train, start=1):
        if step <= done:
            tick = time.perf_counter()
            continue
        logits, parts = _step(model, x, y, loss_fn, optimizer, amp, scaler, clip_grad_norm,
                              f"epoch {epoch}, step {step}")  # fmt: skip
        scheduler.step()
        for name, value in parts.items():
            tally.sums[name] = tally.sums.get(name, 0.0) + value.item() * len(y)
        tally.correct += (logits.argmax(dim=1) == y).sum().item()  # -1 (no label) never matches
        tally.labeled += (y >= 0).sum().item()
        tally.count += len(y)
        tally.step = step
        now = time.perf_counter()  # the time since the last step: batch preparation included
        tally.seconds += now - tick
        tick = now
        progress.update(epoch, epochs, tally.sums["loss"] / tally.count,
                        100 * tally.correct / max(tally.labeled, 1),
                        tally.count / tally.seconds)  # fmt: skip
        if distributed.any_rank(stop.signal is not None):
            raise _Stopped


def _step(
    model, x, y, loss_fn, optimizer, amp, scaler: torch.amp.GradScaler | None,
    clip_grad_norm: float | None, where: str,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """One optimizer step under autocast; float16 losses scaled, gradients clipped if asked.

    Raises:
        TrainingError: the loss is not finite, in this process or another (before the backward).
    """
    with amp or contextlib.nullcontext():
        logits, parts = loss_fn(model, x, y)
    loss = parts["loss"]
    finite = bool(torch.isfinite(loss))
    if distributed.any_rank(not finite):  # every process stops here, before the backward
        value = loss.item() if not finite else "not finite in another process"
        raise TrainingError(
            f"the loss became {value} at {where}; the last good "
            "checkpoint is kept. Usual causes: a learning rate too high (lower optimizer.lr), "
            "or float16 overflow (device.amp_dtype=bfloat16 or device.amp=false)"
        )
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # float16: scale the loss so small gradients do not vanish
        scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
            parts["grad_norm"] = clip_gradients(optimizer, clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad_norm is not None:
            parts["grad_norm"] = clip_gradients(optimizer, clip_grad_norm)
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
