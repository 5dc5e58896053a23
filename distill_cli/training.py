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
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_cli.console import StageProgress

log = logging.getLogger("distill_cli")

# (model, images, labels) -> (logits, {"loss": total, other named terms...})
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
# (name "best" | "last", epoch, validation accuracy or None) -> None
SaveFn = Callable[[str, int, float | None], None]


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


@torch.no_grad()
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
    best_so_far: float = -1.0,
) -> dict:
    """Train for ``epochs`` epochs; validate, log, and checkpoint (last, and best on validation).

    Returns:
        Summary with ``best_epoch``, ``best_val_acc``, ``last_val_acc``, ``train_time_s`` and
        ``images_per_sec``. Without a validation set the last epoch counts as the best.
    """
    total_epochs = total_epochs or first_epoch + epochs - 1
    steps = len(train) * epochs  # type: ignore[arg-type]
    best = {"best_epoch": None, "best_val_acc": best_so_far if best_so_far >= 0 else None}
    seen, train_time, last_val = 0, 0.0, None
    with StageProgress(steps, "training") as progress:
        for epoch in range(first_epoch, first_epoch + epochs):
            row = _train_epoch(
                model, train, loss_fn, optimizer, scheduler, amp, frozen_backbone, progress,
                epoch, total_epochs,
            )  # fmt: skip
            seen += row.pop("images")
            train_time += row["epoch_time_s"]
            if val is not None:
                scores = evaluate(model, val, amp)
                row.update(val_acc=scores["top1"], val_top5=scores["top5"], val_nll=scores["nll"])
                last_val = scores["top1"]
            improved = (
                val is None or best["best_val_acc"] is None or last_val > best["best_val_acc"]
            )
            save("last", epoch, last_val)
            if improved:
                best = {"best_epoch": epoch, "best_val_acc": last_val}
                save("best", epoch, last_val)
            with open(metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            log.info(_epoch_line(row))
    return {
        **best,
        "last_val_acc": last_val,
        "train_time_s": round(train_time, 3),
        "images_per_sec": round(seen / train_time, 1) if train_time > 0 else None,
    }


def _train_epoch(
    model, train, loss_fn, optimizer, scheduler, amp, frozen_backbone, progress, epoch, epochs
) -> dict:
    """One pass over the training batches; returns the epoch's metrics row."""
    set_train_mode(model, frozen_backbone)
    if hasattr(train, "set_epoch"):
        train.set_epoch(epoch)
    sums: dict[str, float] = {}
    correct = count = 0
    lr = optimizer.param_groups[-1]["lr"]
    start = time.perf_counter()
    for step, (x, y) in enumerate(train, start=1):
        with amp or contextlib.nullcontext():
            logits, parts = loss_fn(model, x, y)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} at epoch {epoch}, step {step}; the last good "
                "checkpoint is kept. Usual causes: a learning rate too high (lower optimizer.lr), "
                "or float16 overflow (device.amp_dtype=bfloat16 or device.amp=false)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.item() * len(y)
        correct += (logits.argmax(dim=1) == y).sum().item()
        count += len(y)
        elapsed = time.perf_counter() - start
        progress.update(epoch, epochs, sums["loss"] / count, 100 * correct / count, count / elapsed)
    elapsed = time.perf_counter() - start
    row = {"epoch": epoch, "lr": lr, "images": count, "epoch_time_s": round(elapsed, 3)}
    row.update({f"train_{k}": v / max(count, 1) for k, v in sums.items()})
    row["train_acc"] = 100 * correct / max(count, 1)
    row["images_per_sec"] = round(count / elapsed, 1) if elapsed > 0 else None
    return row


def _epoch_line(row: dict) -> str:
    val = f"  val {row['val_acc']:.2f}%" if "val_acc" in row else ""
    return (
        f"epoch {row['epoch']}: loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%{val}"
        f"  lr {row['lr']:.3g}  {row['images_per_sec'] or 0:,.0f} img/s"
    )
