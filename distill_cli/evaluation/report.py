"""The report stage: one row per configuration, mean ± std over seeds, paired gains, failures.

    distill-cli report run=demo                                  # outputs/demo/report.md, .csv
    distill-cli report run=demo stage.metrics=[best_val_acc,top1,top5,train_time_s]
    distill-cli report run=demo stage.runs=[demo_seed1,demo_seed2]   # runs of other seeds too

Writes ``<run>/report.md`` (the tables below, with what they mean) and ``<run>/report.csv`` (one
row per configuration, every metric as mean, std and n), and prints the same tables. The
arithmetic lives in aggregate.py; this module only reads JSON and YAML, so torch is not imported.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill_cli import console
from distill_cli.evaluation.aggregate import (
    COMPARED_STAGES,
    FROM_EVAL,
    Configuration,
    Job,
    Stat,
    choose_baselines,
    collect_jobs,
    group,
    partial_keys,
)
from distill_cli.rundir import write_text

log = logging.getLogger("distill_cli")

LATEST = ".latest"  # checkpoint.LATEST, repeated so that this module never imports torch
# Every metric a report can show: (header, format). config.REPORT_METRICS lists the same names.
METRICS = {
    "best_val_acc": ("val@best", ".1f"), "last_val_acc": ("val@last", ".1f"),
    "best_epoch": ("best ep", ".0f"), "train_time_s": ("time s", ".1f"),
    "params": ("params", ",.0f"), "top1": ("top1", ".1f"), "top5": ("top5", ".1f"),
    "nll": ("nll", ".3f"), "ece": ("ece", ".1f"), "agreement": ("agree", ".1f"),
    "kept": ("kept", ".1f"), "macs": ("MACs", ",.0f"), "latency_ms_p50": ("ms p50", ".2f"),
}  # fmt: skip
GAIN_METRICS = ("best_val_acc", "top1")
Table = tuple[list[tuple[str, str]], list[dict[str, str]]]  # (key, header) columns; string rows


class ReportError(Exception):
    """A run that cannot be reported on; the message is one line."""


def report_run(cfg: DictConfig, job_subdir: str | None = None) -> None:
    """Write ``<run>/report.md`` and ``<run>/report.csv`` and print the same tables.

    Both files are derived from the run's folders, so a new report replaces them (atomically).
    ``stage.runs`` adds the jobs of other runs; ``job_subdir`` is unused: a report covers a run.
    """
    _log_to_console()
    run_dir = _run_dir(Path(cfg.out_dir), cfg.run)
    jobs = collect_jobs(run_dir)
    for other in dict.fromkeys(r for r in cfg.stage.runs if r != run_dir.name):
        jobs += collect_jobs(_run_dir(Path(cfg.out_dir), other), prefix=f"{other}:")
    if not jobs:
        raise ReportError(
            f"run '{run_dir.name}' holds no stage folders yet; train one first, "
            f"e.g. `distill-cli pretrain run={run_dir.name}`"
        )
    metrics = list(cfg.stage.metrics)
    configs = group(jobs)
    choose_baselines(configs)
    notes = _notes(run_dir, jobs, configs, metrics)
    write_text(run_dir / "report.md", render_markdown(run_dir.name, configs, jobs, metrics, notes))
    write_text(run_dir / "report.csv", render_csv(configs))
    title = f"report · run {run_dir.name}"
    failed = [j for j in jobs if not j.finished]
    _print(
        f"{title} · {len(jobs)} jobs in {len(configs)} configurations, mean ± std over seeds",
        configuration_table(configs, metrics),
    )
    gains = gain_table(configs)
    if gains[1]:
        _print(
            f"{title} · paired gain over training from scratch (same model, images, seed)", gains
        )
    if failed:
        _print(f"{title} · {len(failed)} failed or unfinished", failed_table(jobs))
    for note in notes:
        log.info("%s", note)
    log.info(
        "%d of %d jobs failed or unfinished; wrote %s and %s",
        len(failed),
        len(jobs),
        run_dir / "report.md",
        run_dir / "report.csv",
    )


# --- tables -------------------------------------------------------------------------------------


def cell(stat: Stat, spec: str, n: int | None = None, sign: bool = False) -> str:
    """``mean ± std``; the mean alone for one value; ``(n=k)`` when k differs from the row's n."""
    if stat.mean is None:
        return "-"
    text = f"{stat.mean:{'+' if sign else ''}{spec}}"
    if stat.std is not None:
        text += f" ± {stat.std:{spec}}"
    return text + (f" (n={stat.n})" if n is not None and stat.n != n else "")


def configuration_table(configs: list[Configuration], metrics: list[str]) -> Table:
    """The main table: one row per configuration, n finished jobs, mean ± std of each metric."""
    columns = [
        ("configuration", "configuration"),
        ("model", "model"),
        ("dataset", "dataset"),
        ("labels", "labels/class"),
        ("n", "n"),
        ("seeds", "seeds"),
    ]
    if any(len(c.finished) < len(c.jobs) for c in configs):
        columns.append(("failed", "failed"))
    columns += [(m, METRICS[m][0]) for m in metrics]
    rows = []
    for c in configs:
        n = len(c.finished)
        row = {
            "configuration": c.name,
            "model": c.first.model or "-",
            "n": str(n),
            "dataset": str(c.first.config.get("dataset.name", "-")),
            "labels": c.labels,
            "seeds": seeds(c),
            "failed": str(len(c.jobs) - n),
        }
        row.update({m: cell(c.stat(m), METRICS[m][1], n) for m in metrics})
        rows.append(row)
    return columns, _align(rows, ["n", "failed", *metrics])


def gain_table(configs: list[Configuration]) -> Table:
    """Each distilled student's (and finetuned model's) paired gain over its scratch baseline."""
    columns = [
        ("configuration", "configuration"),
        ("from", "from"),
        ("baseline", "baseline"),
        ("pairs", "pairs"),
    ] + [(m, "Δ " + METRICS[m][0]) for m in GAIN_METRICS]
    rows = []
    for c in configs:
        if c.first.stage not in COMPARED_STAGES:
            continue
        b, pairs = c.baseline, c.pairs()
        chosen = "-" if b is None else b.name
        if c.candidates > 1:
            chosen += f" (best val of {c.candidates})"
        row = {
            "configuration": c.name,
            "baseline": chosen,
            "pairs": str(pairs),
            "from": ", ".join(sorted({j.parent for j in c.jobs if j.parent})) or "-",
        }
        row.update({m: cell(c.gain(m), METRICS[m][1], pairs, sign=True) for m in GAIN_METRICS})
        rows.append(row)
    return columns, _align(rows, ["pairs", *GAIN_METRICS])


def failed_table(jobs: list[Job]) -> Table:
    """The jobs that failed or did not finish, with the error their manifest recorded."""
    columns = [
        ("folder", "folder"),
        ("stage", "stage"),
        ("status", "status"),
        ("epochs", "epochs"),
        ("error", "error"),
    ]
    rows = [
        {
            "folder": j.folder,
            "stage": j.stage or "-",
            "status": j.status,
            "epochs": j.epochs or "-",
            "error": j.error or "-",
        }
        for j in jobs
        if not j.finished
    ]
    return columns, rows


def seeds(c: Configuration) -> str:
    """The finished jobs' seeds; ``seed/subset_seed`` where subset seeds vary and differ."""
    reps = sorted((j.replicate for j in c.finished), key=lambda r: [str(v).zfill(12) for v in r])
    varied = len({sub for _, sub in reps}) > 1
    return (
        ",".join(f"{s}/{sub}" if varied and sub not in (None, s) else str(s) for s, sub in reps)
        or "-"
    )


def _align(rows: list[dict], keys: list[str]) -> list[dict]:
    """Right-align number columns by padding, so that rich and plain markdown line them up."""
    for key in keys:
        width = max((len(r.get(key, "")) for r in rows), default=0)
        for r in rows:
            if key in r:
                r[key] = r[key].rjust(width)
    return rows


def _print(title: str, table: Table) -> None:
    from rich.markup import escape  # a value such as dataset.classes=[cat,dog] is not markup

    columns, rows = table
    rows = [{k: escape(v) for k, v in r.items()} for r in rows]
    console.print_table(escape(title), [(key, header, "") for key, header in columns], rows)


# --- files --------------------------------------------------------------------------------------


def render_markdown(
    run: str, configs: list[Configuration], jobs: list[Job], metrics: list[str], notes: list[str]
) -> str:
    """The report as markdown: what the numbers are, the tables, and notes."""
    failed = [j for j in jobs if not j.finished]
    text = [
        f"# Report · run {run}",
        "",
        f"`distill-cli report`, {time.strftime('%Y-%m-%d %H:%M')}: {len(jobs)} jobs in "
        f"{len(configs)} configurations, {len(failed)} failed or unfinished.",
        "",
        "Each cell is the mean ± sample standard deviation (ddof=1) over the n finished jobs of "
        "a configuration (the value alone when n=1; `(n=k)` where only k jobs have the metric). "
        "A configuration is a tag with its resolved config, less `seed`, `dataset.subset_seed` "
        "and bookkeeping keys. labels/class: labelled images per class trained on + held out "
        "for validation (`K+0`: nothing held out, best.pt is the last epoch). "
        "val@best and val@last: validation accuracy at the best and at the "
        "last epoch. top1, top5, nll, ece: on the test split, of best.pt (the epoch chosen on "
        "validation), from eval/metrics.json.",
        "",
        "## Configurations",
        "",
        *_markdown(configuration_table(configs, metrics)),
        "",
    ]
    gains = gain_table(configs)
    if gains[1]:
        text += [
            "## Paired gains over training from scratch",
            "",
            "Each distilled student (and finetuned model) against the `pretrain` configuration "
            "of the same model on the same images and labelled budget, replicate by replicate "
            "(same `seed` and `dataset.subset_seed`): gain = its metric − the scratch metric, "
            "mean ± std over the pairs. Where several scratch configurations qualify, the "
            "baseline is the one with the best mean val@best (validation, never test).",
            "",
            *_markdown(gains),
            "",
        ]
    if failed:
        text += ["## Failed or unfinished jobs", "", *_markdown(failed_table(jobs)), ""]
    if notes:
        text += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(text)


def _markdown(table: Table) -> list[str]:
    columns, rows = table
    right = {
        k
        for k, _ in columns
        if rows and all(r[k].startswith(" ") or _is_number(r[k]) for r in rows)
    }
    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "|" + "|".join("---:" if k in right else "---" for k, _ in columns) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(r[k].replace("|", "\\|") for k, _ in columns) + " |")
    return lines


def _is_number(text: str) -> bool:
    head = text.split(" ")[0].lstrip("+-").replace(",", "").replace(".", "", 1)
    return head.isdigit() or head == ""


def render_csv(configs: list[Configuration]) -> str:
    """One row per configuration: mean, std and n of every metric and gain, full precision."""
    rows = []
    for c in configs:
        row: dict[str, Any] = {
            "configuration": c.name,
            "tag": c.first.tag,
            "stage": c.first.stage,
            "model": c.first.model,
            "dataset": c.first.config.get("dataset.name"),
            "labels": c.labels,
            "n": len(c.finished),
            "failed": len(c.jobs) - len(c.finished),
            "seeds": seeds(c),
        }
        for m in METRICS:
            row.update(_stat_fields(m, c.stat(m)))
        row.update(baseline=c.baseline.name if c.baseline else None, pairs=c.pairs())
        for m in GAIN_METRICS:
            row.update(_stat_fields(f"gain_{m}", c.gain(m)))
        row["jobs"] = ";".join(j.folder for j in c.jobs)
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buffer.getvalue()


def _stat_fields(name: str, stat: Stat) -> dict[str, Any]:
    def plain(v: float | None) -> float | None:
        return None if v is None else round(v, 6)

    return {f"{name}_mean": plain(stat.mean), f"{name}_std": plain(stat.std), f"{name}_n": stat.n}


# --- helpers of the stage -----------------------------------------------------------------------


def _notes(
    run_dir: Path, jobs: list[Job], configs: list[Configuration], metrics: list[str]
) -> list[str]:
    """What a reader needs to trust the numbers: missing or stale eval, mixed config versions."""
    notes = [f"{j.folder}: {j.note}" for j in jobs if j.note]
    if any(m in FROM_EVAL for m in metrics) and not (run_dir / "eval" / "metrics.json").is_file():
        notes.append(
            f"no eval/metrics.json: `distill-cli eval run={run_dir.name}` adds the test metrics"
        )
    partial = partial_keys(jobs)
    for keys in dict.fromkeys(tuple(k) for k in partial.values()):
        tags = [tag for tag, k in partial.items() if tuple(k) == keys]
        notes.append(
            f"some config.yaml files lack {', '.join(keys)} that others of the same methods and "
            "models have (written by another version of distill-cli); "
            f"ignored when grouping {', '.join(tags)}"
        )
    for c in configs:
        reps = [j.replicate for j in c.finished]
        if len(set(reps)) < len(reps):
            notes.append(
                f"{c.name}: several jobs share a seed; all count in n, one of them in the pairing"
            )
    return notes


def _run_dir(out_dir: Path, run: str | None) -> Path:
    """``<out_dir>/<run>``, or the most recent run; a missing run names those that exist."""
    if run is None:
        latest = out_dir / LATEST
        run = latest.read_text().strip() if latest.is_file() else None
        if run:
            log.info("report on the most recent run '%s' (pass run=NAME to choose)", run)
    if run is None or not (out_dir / run).is_dir():
        runs = (
            sorted(p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            if out_dir.is_dir()
            else []
        )
        what = f"run '{run}' does not exist in '{out_dir}'" if run else f"no run in '{out_dir}'"
        raise ReportError(f"{what}; runs there: {', '.join(runs) or 'none'}")
    return out_dir / run


def _log_to_console() -> None:
    """Log records to the console only (runtime.setup_logging would import torch)."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(console.log_handler())
