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


MARKERS_UP_TO = 40  # points per line drawn with markers; longer lines are plain
MAX_LEGEND = 12  # lines per panel that get a legend entry; beyond, the panel says how many
GRAD_NORM = "train_grad_norm"  # a gradient norm, not a loss: drawn on its own axis
NOT_LOSSES = {"train_acc", GRAD_NORM, "train_temperature"}  # the last: CTKD's learned temperature


def _loss_terms(rows: list[dict]) -> list[str]:
    """The ``train_*`` loss keys of the rows, total first (not accuracy, not the grad norm)."""
    terms = {k for row in rows for k in row if k.startswith("train_")}
    terms -= NOT_LOSSES
    return sorted(terms, key=lambda k: (k != "train_loss", k))


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    """(epochs, values) of the rows that hold ``key``."""
    kept = [row for row in rows if row.get(key) is not None]
    return [row["epoch"] for row in kept], [row[key] for row in kept]


def curve_groups(histories: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """Jobs grouped into one row of panels per tag: ``distill/optimizer.lr=0.02`` joins ``distill``.

    Returns:
        Group name -> {line label (the job's folder below the tag, or the tag) -> rows}.
    """
    groups: dict[str, dict[str, list[dict]]] = {}
    for tag, rows in histories.items():
        group, _, rest = tag.partition("/")
        groups.setdefault(group, {})[rest or group] = rows
    return groups


def marker(points: int) -> str | None:
    """A dot on every epoch while a line is short enough to read them; none past that."""
    return "." if points <= MARKERS_UP_TO else None


def learning_curves(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """One row of panels per tag: training loss terms, validation accuracy, gradient norm.

    Jobs of one tag (a multirun's learning rates, seeds) share a row, one colour each; loss
    terms are told apart by line style. Rows keep the order in which their tags first appear.

    Args:
        histories: Run tag -> its ``metrics.jsonl`` rows (``epoch``, ``train_loss``, optional
            ``train_<term>``, ``train_grad_norm`` and ``val_acc``).
        path: Where the PNG goes.
    """
    groups = curve_groups(histories) or {"no history": {}}
    has_norm = any(GRAD_NORM in row for rows in histories.values() for row in rows)
    ncols = 3 if has_norm else 2
    fig, rows = _grid(len(groups), ncols)
    for axes, (group, jobs) in zip(rows, groups.items(), strict=True):
        _curve_row(list(axes), group, jobs)
    fig.suptitle("Learning curves: one row per tag, one colour per job")
    return _save(fig, path)


def _grid(rows: int, cols: int) -> tuple[Figure, Any]:
    """A figure of ``rows`` x ``cols`` axes (a 2-D array, even for one row)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * cols, 3.4 * rows + 0.6), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _curve_row(axes: list, group: str, jobs: dict[str, list[dict]]) -> None:
    """One tag's panels: loss terms (styles), validation accuracy and gradient norm (colours)."""
    loss_ax, acc_ax, *rest = axes
    norm_ax = rest[0] if rest else None
    terms = list(dict.fromkeys(t for rows in jobs.values() for t in _loss_terms(rows)))
    styles = dict(zip(terms, itertools.cycle(LINESTYLES)))
    for i, (label, rows) in enumerate(jobs.items()):
        color = f"C{i % 10}"
        for term in _loss_terms(rows):
            epochs, values = _series(rows, term)
            loss_ax.plot(epochs, values, styles[term], color=color, marker=marker(len(epochs)),
                         linewidth=1.2)  # fmt: skip
        for ax, key in ((acc_ax, "val_acc"), (norm_ax, GRAD_NORM)):
            epochs, values = _series(rows, key)
            if ax is not None and epochs:
                ax.plot(epochs, values, "-", color=color, marker=marker(len(epochs)),
                        linewidth=1.2, label=label)  # fmt: skip
    loss_ax.set(title=f"{group}: training loss terms", xlabel="epoch", ylabel="loss per sample")
    if len(terms) > 1:  # the style legend: which term each line style is
        handles = [loss_ax.plot([], [], styles[t], color="0.3")[0] for t in terms]
        loss_ax.legend(handles, [t.removeprefix("train_") for t in terms], fontsize="small")
    acc_ax.set(title=f"{group}: validation accuracy", xlabel="epoch", ylabel="top-1 (%)")
    if norm_ax is not None:
        norm_ax.set(title=f"{group}: gradient norm before clipping", xlabel="epoch",
                    ylabel="L2 norm (mean per step)")  # fmt: skip
        if norm_ax.has_data():
            norm_ax.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    _job_legend(acc_ax, len(jobs))


def _job_legend(ax: Any, jobs: int) -> None:
    """A legend of the jobs' colours, or a count where there are too many to read."""
    if not ax.has_data():
        ax.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax.transAxes)
    elif jobs <= MAX_LEGEND:
        ax.legend(fontsize="small")
    else:
        ax.text(0.02, 0.02, f"{jobs} jobs", transform=ax.transAxes, fontsize="small")


def against_shots(
    series: list[dict], path: str | Path, *, ylabel: str, title: str, zero: bool = False
) -> Path:
    """Mean ± std band of each configuration against labelled images per class (log scale).

    Args:
        series: One dict per configuration: ``name``, ``shots`` (ascending ints), ``mean`` and
            ``std`` (floats or None, one per shots value; a missing std draws no band);
            optionally ``color``, an index that keeps a configuration's colour across figures.
        path: Where the PNG goes.
        ylabel: The y axis label with its unit.
        title: The figure title.
        zero: Draw the zero line (for gains).
    """
    fig, ax = _figure(width=7.5, height=5)
    ticks: set[int] = set()
    for i, s in enumerate(series):
        points = [(k, m, sd) for k, m, sd in zip(s["shots"], s["mean"], s["std"], strict=True)
                  if m is not None]  # fmt: skip
        if not points:
            continue
        xs, means, stds = zip(*points, strict=True)
        n = s.get("color", i)  # one configuration keeps its colour across figures
        color, style = f"C{n % 10}", LINESTYLES[(n // 10) % len(LINESTYLES)]
        ax.plot(xs, means, style, color=color, marker="o", label=s["name"])
        low = [m - (sd or 0.0) for m, sd in zip(means, stds, strict=True)]
        high = [m + (sd or 0.0) for m, sd in zip(means, stds, strict=True)]
        ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
        ticks.update(xs)
    if zero:
        ax.axhline(0.0, color="0.3", linewidth=0.8)
    if ticks:
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
        ax.minorticks_off()
        ax.legend(fontsize="small")
    ax.set(title=title, xlabel="labelled images per class (log scale)", ylabel=ylabel)
    ax.grid(alpha=0.3)
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
