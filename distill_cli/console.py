"""What a person sees: progress bars, per-stage summaries, the eval table and one-line errors.

Everything printed by distill-cli goes through this module; the rest of the code logs. Only
``rich.console`` loads with it: ``--help`` and a one-line error need no tables or progress bars.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console

err = Console(stderr=True)
out = Console()
for _c in (err, out):
    if not _c.is_terminal:  # logs and CI: wide enough that tables and log lines do not wrap
        _c.width = max(_c.width, 150)


def log_handler() -> logging.Handler:
    """A rich console handler for the package logger."""
    from rich.logging import RichHandler

    return RichHandler(console=err, show_path=False, markup=False, rich_tracebacks=False)


def print_error(message: str) -> None:
    """One-line error on stderr; no traceback."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


class StageProgress:
    """A progress bar over the steps of a stage with live loss, accuracy and images/s.

    Disabled when stderr is not a terminal (CI, make, log files): the per-epoch log lines carry
    the same numbers there; ``show=False`` disables it too (the other processes of a torchrun).
    """

    def __init__(self, total_steps: int, description: str, show: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not (show and err.is_terminal),
        )
        self._task = self._progress.add_task(description, total=total_steps, status="")

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, epoch: int, epochs: int, loss: float, acc: float, ips: float) -> None:
        """Advance one step and show the running numbers."""
        status = f"epoch {epoch}/{epochs}  loss {loss:.3f}  acc {acc:5.1f}%  {ips:,.0f} img/s"
        self._progress.update(self._task, advance=1, status=status)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def print_summary(title: str, rows: Mapping[str, Any]) -> None:
    """A two-column table closing a stage."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, _fmt(value))
    out.print(table)


def print_table(
    title: str, columns: list[tuple[str, str, str]], rows: Iterable[Mapping[str, Any]]
) -> None:
    """A table with one row per mapping; ``columns`` holds (key, header, format spec) triples.

    The first column never wraps or truncates; numbers are right-aligned.
    """
    from rich.table import Table

    rows = list(rows)
    table = Table(title=title, title_justify="left")
    for i, (key, header, _) in enumerate(columns):
        numeric = any(isinstance(r.get(key), (int, float)) for r in rows)
        width = max([len(str(r.get(key))) for r in rows] + [len(header)]) if i == 0 else None
        table.add_column(header, justify="right" if numeric else "left", min_width=width,
                         no_wrap=True)  # fmt: skip
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec) if spec else str(value))
        table.add_row(*cells)
    out.print(table)
