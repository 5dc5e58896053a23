"""PNG figures for a run: learning curves, accuracy-cost trade-offs and confusion matrices.

``distill-cli eval`` calls these with plain data and writes the PNGs into the run directory.
Matplotlib is imported inside each function, so importing this module stays cheap. Figures are
built with ``matplotlib.figure.Figure`` and drawn by the Agg renderer: no display is needed, and
no pyplot state is touched (a notebook's backend and open figures are left alone).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

DPI = 120
MAX_TICK_LABELS = 30  # beyond this many classes, tick labels overlap into a grey bar
MAX_CELL_TEXT = 12  # write the fraction into each cell up to this many classes
LINESTYLES = ("-", "--", ":", "-.")


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.8) -> tuple[Figure, Any]:
    """A pyplot-free figure with ``ncols`` axes and a tight layout."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="tight")
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG, creating the folder, and release it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()
    return path


def _loss_terms(rows: list[dict]) -> list[str]:
    """The ``train_*`` loss keys of the rows, total first (``train_acc`` is not a loss)."""
    terms = {k for row in rows for k in row if k.startswith("train_") and k != "train_acc"}
    return sorted(terms, key=lambda k: (k != "train_loss", k))


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """(epochs, values) of the rows that hold ``key``."""
    kept = [row for row in rows if row.get(key) is not None]
    return [row["epoch"] for row in kept], [row[key] for row in kept]


def learning_curves(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """Training loss terms and validation accuracy per epoch, one colour per run tag.

    Args:
        histories: Run tag -> its ``metrics.jsonl`` rows (``epoch``, ``train_loss``, optional
            ``train_<term>``, optional ``val_acc``).
        path: Where the PNG goes.
    """
    fig, (loss_ax, acc_ax) = _figure(ncols=2, width=12, height=4.5)
    for i, (tag, rows) in enumerate(histories.items()):
        color = f"C{i % 10}"
        for style, term in zip(itertools.cycle(LINESTYLES), _loss_terms(rows)):
            epochs, values = _series(rows, term)
            label = f"{tag}: {term.removeprefix('train_')}"
            loss_ax.plot(epochs, values, style, color=color, marker=".", label=label)
        epochs, values = _series(rows, "val_acc")
        if epochs:
            acc_ax.plot(epochs, values, "-", color=color, marker="o", label=tag)
    loss_ax.set(title="Training loss terms", xlabel="epoch",
                ylabel="loss (mean per training sample)")  # fmt: skip
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="top-1 accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.suptitle("Learning curves")
    return _save(fig, path)


def tradeoff(
    points: list[dict], x: str, path: str | Path, *, xlabel: str, log_x: bool = True
) -> Path:
    """Top-1 accuracy against a cost, one labelled point per model.

    Args:
        points: Rows with ``top1`` (percent), the cost ``x``, a ``tag`` to write beside the
            point, and ``model`` or ``role`` to pick its colour; rows missing a value are skipped.
        x: The cost key, e.g. ``macs`` or ``latency_ms_p50``.
        path: Where the PNG goes.
        xlabel: Axis label with its unit, e.g. ``"MACs per image (log scale)"``.
        log_x: Logarithmic cost axis (costs span orders of magnitude).
    """
    fig, ax = _figure(width=7, height=5)
    usable = [p for p in points if p.get(x) is not None and p.get("top1") is not None]
    if log_x:
        usable = [p for p in usable if p[x] > 0]
    groups: dict[str, list[dict]] = {}
    for point in usable:
        groups.setdefault(str(point.get("model", point.get("role", "model"))), []).append(point)
    for i, (group, members) in enumerate(groups.items()):
        xs, ys = [p[x] for p in members], [p["top1"] for p in members]
        ax.scatter(xs, ys, s=60, color=f"C{i % 10}", label=group, zorder=3)
        for p in members:
            ax.annotate(str(p.get("tag", "")), (p[x], p["top1"]), xytext=(5, 5),
                        textcoords="offset points", fontsize="small")  # fmt: skip
    if log_x:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)  # room for the tags beside the outermost points
    ax.set(title=f"Top-1 accuracy against {xlabel}", xlabel=xlabel, ylabel="top-1 accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    if groups:
        ax.legend(fontsize="small")
    return _save(fig, path)


def confusion_counts(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    import torch

    labels, predictions = labels.long().flatten().cpu(), predictions.long().flatten().cpu()
    if labels.shape != predictions.shape:
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got "
                             f"[{values.min().item()}, {values.max().item()}]")  # fmt: skip
    flat = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def confusion_matrix(
    labels: Tensor, predictions: Tensor, class_names: list[str], path: str | Path, *, title: str
) -> Path:
    """Row-normalised confusion matrix: each row shows where one true class's samples went.

    Args:
        labels: (N,) true classes.
        predictions: (N,) predicted classes.
        class_names: One name per class, in index order.
        path: Where the PNG goes.
        title: Figure title, e.g. the run tag and split.
    """
    n = len(class_names)
    counts = confusion_counts(labels, predictions, n).double()
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)  # empty rows stay 0
    side = min(4 + 0.35 * n, 9)
    fig, ax = _figure(width=side + 1.5, height=side)
    image = ax.imshow(fractions.tolist(), cmap="Blues", vmin=0, vmax=1)
    # fraction/pad: the usual values that make the colour bar as tall as a square matrix
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class's samples")
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), class_names)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if n <= MAX_CELL_TEXT:
        for (row, col), value in _cells(fractions):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize="small",
                    color="white" if value > 0.5 else "black")  # fmt: skip
    axis = "" if n <= MAX_TICK_LABELS else f" (index 0 to {n - 1})"
    ax.set(title=title, xlabel=f"predicted class{axis}", ylabel=f"true class{axis}")
    return _save(fig, path)


def _cells(matrix: Tensor) -> list[tuple[tuple[int, int], float]]:
    """((row, column), value) for every cell of a 2-D tensor."""
    return [((r, c), v) for r, row in enumerate(matrix.tolist()) for c, v in enumerate(row)]
