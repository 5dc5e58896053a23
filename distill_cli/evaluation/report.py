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
import fnmatch
import io
import logging
import time
from dataclasses import dataclass
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
    WeakTeacher,
    choose_baselines,
    collect_jobs,
    group,
    partial_keys,
    weak_teachers,
)
from distill_cli.evaluation.curves import (
    Curve,
    metric_for,
    moving_keys,
    moving_note,
    shots_curves,
)
from distill_cli.evaluation.study import StudyError, study_tables
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
    for other in other_runs(Path(cfg.out_dir), list(cfg.stage.runs), run_dir.name):
        jobs += collect_jobs(_run_dir(Path(cfg.out_dir), other), prefix=f"{other}:")
    if not jobs:
        raise ReportError(
            f"run '{run_dir.name}' holds no stage folders yet; train one first, "
            f"e.g. `distill-cli pretrain run={run_dir.name}`"
        )
    metrics = list(cfg.stage.metrics)
    configs = group(jobs)
    choose_baselines(configs)
    weak = weak_teachers(configs, jobs)
    notes = _notes(run_dir, jobs, configs, metrics) + [w.note() for w in weak]
    moving = moving_keys(configs)
    curves = shots_curves(configs, moving)
    if curves:
        notes += moving_note(moving)
    shots = _shots_files(run_dir, curves, metrics) if curves else None
    text = render_markdown(run_dir.name, configs, jobs, metrics, notes, shots, weak)
    studies = _studies(run_dir)
    text += "".join(f"\n## {title}\n\n" + "\n".join(_markdown(table)) + "\n"
                    for title, table in studies)  # fmt: skip
    write_text(run_dir / "report.md", text)
    write_text(run_dir / "report.csv", render_csv(configs))
    title = f"report · run {run_dir.name}"
    failed = [j for j in jobs if j.failed]
    _print(
        f"{title} · {len(jobs)} jobs in {len(configs)} configurations, mean ± std over seeds",
        configuration_table(configs, metrics),
    )
    gains = gain_table(configs, weak)
    if gains[1]:
        _print(
            f"{title} · paired gain over training from scratch (same model, images, seed)", gains
        )
    if shots:
        metric = METRICS[shots.metric][0]
        _print(f"{title} · {metric} against labelled images per class", shots.values)
        _print(f"{title} · Δ {metric} over scratch against labelled images per class", shots.gains)
    if failed:
        _print(f"{title} · {len(failed)} failed or unfinished", failed_table(jobs))
    for study_title, table in studies:
        _print(f"{title} · {study_title}", table)
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
    if any(j.failed for c in configs for j in c.jobs):
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
            "failed": str(sum(j.failed for j in c.jobs)),
        }
        row.update({m: cell(c.stat(m), METRICS[m][1], n) for m in metrics})
        rows.append(row)
    return columns, _align(rows, ["n", "failed", *metrics])


def gain_table(configs: list[Configuration], weak: list[WeakTeacher] | None = None) -> Table:
    """Each distilled student's (and finetuned model's) paired gain over its scratch baseline.

    ``weak`` (from ``aggregate.weak_teachers``) fills the ``teacher < scratch`` column: in how
    many replicates the teacher scored below the scratch student on validation.
    """
    below: dict[str, int] = {}
    for w in weak or []:
        below[w.student] = below.get(w.student, 0) + 1
    columns = [
        ("configuration", "configuration"),
        ("from", "from"),
        ("baseline", "baseline"),
        ("pairs", "pairs"),
        ("weak", "teacher < scratch"),
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
            "from": ", ".join(sorted({_parent_shown(j) for j in c.jobs if j.parent})) or "-",
            "weak": _weak_cell(c, below),
        }
        row.update({m: cell(c.gain(m), METRICS[m][1], pairs, sign=True) for m in GAIN_METRICS})
        rows.append(row)
    return columns, _align(rows, ["pairs", *GAIN_METRICS])


def _parent_shown(job: Job) -> str:
    """A job's parent folder, less the run prefix it shares with the job (``RUN:finetune``)."""
    run, sep, _ = job.folder.partition(":")
    parent = job.parent or ""
    return parent.removeprefix(run + sep) if sep else parent


def _weak_cell(c: Configuration, below: dict[str, int]) -> str:
    """``k of n`` replicates with a teacher below scratch on validation; ``-`` for finetunes."""
    if c.first.stage != "distill" or c.baseline is None:
        return "-"
    k = sum(below.get(j.folder, 0) for j in c.finished)
    return f"{k} of {c.pairs()}" + (" (!)" if k else "")


@dataclass
class ShotsTables:
    """The shots curves as two tables (metric, gain) and the PNGs drawn from them."""

    metric: str
    values: Table
    gains: Table
    files: list[str]


def shots_tables(curves: list[Curve], metric: str) -> tuple[Table, Table]:
    """(metric, paired gain) as tables: one row per curve, one column per shots value."""
    all_shots = sorted({k for c in curves for k in c.shots})
    columns = [("curve", "configuration")] + [(str(k), f"{k}/class") for k in all_shots]
    values, gains = [], []
    for c in curves:
        by_k = dict(zip(c.shots, zip(c.stats(metric), c.gains(metric), strict=True), strict=True))
        values.append({"curve": c.name} | {str(k): _at(by_k, k, 0) for k in all_shots})
        if any(g.mean is not None for g in c.gains(metric)):
            gains.append({"curve": c.name} | {str(k): _at(by_k, k, 1) for k in all_shots})
    keys = [str(k) for k in all_shots]
    return (columns, _align(values, keys)), (columns, _align(gains, keys))


def _at(by_k: dict[int, tuple[Stat, Stat]], k: int, which: int) -> str:
    if k not in by_k:
        return "-"
    stat = by_k[k][which]
    return cell(stat, ".1f", sign=which == 1) + (f" (n={stat.n})" if stat.mean is not None else "")


def _pruned(jobs: list[Job]) -> int:
    """How many jobs a search's pruner stopped (listed with their study, not as failures)."""
    return sum(j.status == "pruned" for j in jobs)


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
        if j.failed
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
    run: str,
    configs: list[Configuration],
    jobs: list[Job],
    metrics: list[str],
    notes: list[str],
    shots: ShotsTables | None = None,
    weak: list[WeakTeacher] | None = None,
) -> str:
    """The report as markdown: what the numbers are, the tables, and notes."""
    failed = [j for j in jobs if j.failed]
    text = [
        f"# Report · run {run}",
        "",
        f"`distill-cli report`, {time.strftime('%Y-%m-%d %H:%M')}: {len(jobs)} jobs in "
        f"{len(configs)} configurations, {len(failed)} failed or unfinished"
        + (f", {pruned} pruned by a search." if (pruned := _pruned(jobs)) else "."),
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
    gains = gain_table(configs, weak)
    if gains[1]:
        text += [
            "## Paired gains over training from scratch",
            "",
            "Each distilled student (and finetuned model) against the `pretrain` configuration "
            "of the same model on the same images and labelled budget, replicate by replicate "
            "(same `seed` and `dataset.subset_seed`): gain = its metric − the scratch metric, "
            "mean ± std over the pairs. Where several scratch configurations qualify, the "
            "baseline is the one with the best mean val@best (validation, never test). "
            "teacher < scratch: in how many pairs the student's teacher scored below the "
            "scratch student on validation (flagged `(!)`: that teacher was not worth "
            "distilling from).",
            "",
            *_markdown(gains),
            "",
        ]
    if shots:
        text += _shots_markdown(shots)
    if failed:
        text += ["## Failed or unfinished jobs", "", *_markdown(failed_table(jobs)), ""]
    if notes:
        text += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    return "\n".join(text)


def _shots_markdown(shots: ShotsTables) -> list[str]:
    name = METRICS[shots.metric][0]
    where = "the test split" if shots.metric in FROM_EVAL else "validation (run eval for test)"
    gains = [f"### Δ {name} over scratch", "", *_markdown(shots.gains), ""]
    return [
        "## Shots curves",
        "",
        "Configurations that differ only in `dataset.shots` (labelled images per class; the "
        f"validation split follows it), as curves: {name} on {where}, mean ± std over seeds, "
        "and the paired gain over the scratch baseline of the same budget.",
        "",
        *[f"![{f}]({f})" for f in shots.files],
        "",
        f"### {name}",
        "",
        *_markdown(shots.values),
        "",
        *(gains if shots.gains[1] else []),
    ]


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
            "failed": sum(j.failed for j in c.jobs),
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

SHOTS_METRICS = ("top1", "best_val_acc")  # the curves' metric: test top-1 once eval ran


def _shots_files(run_dir: Path, curves: list[Curve], metrics: list[str]) -> ShotsTables | None:
    """Draw report_shots.png and report_gain_shots.png and build their tables."""
    from distill_cli.evaluation import plots  # matplotlib, only when there are curves

    metric = metric_for(curves, [m for m in SHOTS_METRICS if m in metrics] or list(SHOTS_METRICS))
    if metric is None:
        return None
    name = METRICS[metric][0]
    where = "test" if metric in FROM_EVAL else "validation"
    values, gains = shots_tables(curves, metric)
    colors = {c.name: i for i, c in enumerate(curves)}
    files = [plots.against_shots(
        [_series(c, c.stats(metric), colors) for c in curves], run_dir / "report_shots.png",
        ylabel=f"{name} on {where} (%), mean ± std over seeds",
        title=f"{name} against labelled images per class · run {run_dir.name}",
    ).name]  # fmt: skip
    with_gain = [c for c in curves if any(g.mean is not None for g in c.gains(metric))]
    if with_gain:
        files.append(plots.against_shots(
            [_series(c, c.gains(metric), colors) for c in with_gain],
            run_dir / "report_gain_shots.png",
            ylabel=f"Δ {name} over scratch (points), mean ± std over pairs",
            title=f"Gain over training from scratch · run {run_dir.name}", zero=True,
        ).name)  # fmt: skip
    return ShotsTables(metric, values, gains, files)


def _series(curve: Curve, stats: list[Stat], colors: dict[str, int]) -> dict[str, Any]:
    return {"name": curve.name, "shots": curve.shots, "mean": [s.mean for s in stats],
            "std": [s.std for s in stats], "color": colors[curve.name]}  # fmt: skip


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


def _studies(run_dir: Path) -> list[tuple[str, Table]]:
    """The tables of the run's Optuna searches (trials, importances); none without a search."""
    try:
        return study_tables(run_dir)
    except StudyError as exc:
        log.warning("the run's search study cannot be read: %s", exc)
        return []


def _run_dir(out_dir: Path, run: str | None) -> Path:
    """``<out_dir>/<run>``, or the most recent run; a missing run names those that exist."""
    if run is None:
        latest = out_dir / LATEST
        run = latest.read_text().strip() if latest.is_file() else None
        if run:
            log.info("report on the most recent run '%s' (pass run=NAME to choose)", run)
    if run is None or not (out_dir / run).is_dir():
        runs = _runs_in(out_dir)
        what = f"run '{run}' does not exist in '{out_dir}'" if run else f"no run in '{out_dir}'"
        raise ReportError(f"{what}; runs there: {', '.join(runs) or 'none'}")
    return out_dir / run


def _runs_in(out_dir: Path) -> list[str]:
    """The run folders in ``out_dir``, sorted; hidden folders (``.teacher_cache``) are not runs."""
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def other_runs(out_dir: Path, names: list[str], own: str) -> list[str]:
    """The runs named in ``stage.runs``, a shell-style pattern (``cs_k*``) standing for its matches.

    Raises:
        ReportError: A pattern that matches no run (naming the runs there).
    """
    present = _runs_in(out_dir)
    found: list[str] = []
    for name in names:
        if not any(ch in name for ch in "*?["):
            found.append(name)
            continue
        matches = fnmatch.filter(present, name)
        if not matches:
            raise ReportError(
                f"stage.runs pattern '{name}' matches no run in '{out_dir}'; runs there: "
                f"{', '.join(present) or 'none'}"
            )
        found += matches
    return [r for r in dict.fromkeys(found) if r != own]


def _log_to_console() -> None:
    """Log records to the console only (runtime.setup_logging would import torch)."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(console.log_handler())
