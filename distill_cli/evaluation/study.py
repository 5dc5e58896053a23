"""The Optuna study of a search: where it lives, opening it safely, and what it holds.

    distill-cli distill -m hparams_search=kd_logit run=demo   # outputs/demo/optuna.journal
    distill-cli report run=demo                               # trials, best, importances
    optuna-dashboard outputs/demo/optuna.journal              # the same study in a browser

A storage is a path, Optuna's journal file (processes on one machine or on a shared file system
append to it), or a database URL (``sqlite:///search.db``, ``postgresql://...``). A file that is
not Optuna's is refused before Optuna opens it, and left as it was. Optuna is imported only when a
study is opened: the report path never loads it for a run without a search.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill_cli.rundir import write_text

JOURNAL = "optuna.journal"  # the default storage, in the run folder
RECORD = "search.yaml"  # <run>/<tag>/search.yaml: the study's name and storage, then its best
TRIAL_ENV = "DISTILL_CLI_TRIAL"  # a trial's job finds its study and number here (a TrialRef)
PRUNED = "pruned"  # what a pruned trial's job returns to the sweeper
RETIRED = "distill_cli:retired"  # system attr of a trial failed by the sweeper: "stale" | "surplus"
_SQLITE_MAGIC = b"SQLite format 3\x00"


class StudyError(Exception):
    """A study that cannot be opened or continued as asked; the message is one line."""


@dataclass(frozen=True)
class TrialRef:
    """What a trial's job needs to report its epochs to the study."""

    number: int
    storage: str
    study: str
    pruner: dict = field(default_factory=dict)  # the sweeper's pruner config: {"name": ...}

    def to_json(self) -> str:
        """The reference as one JSON line (the value of ``TRIAL_ENV``)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls) -> TrialRef | None:
        """The trial this process runs, or None outside a search."""
        text = os.environ.get(TRIAL_ENV)
        return cls(**json.loads(text)) if text else None


def trial_folder(number: int) -> str:
    """The stage subfolder of trial ``number``: ``trial=<number>``."""
    return f"trial={number}"


def is_url(storage: str) -> bool:
    """A database URL rather than a journal file path."""
    return "://" in storage


def check_storage(storage: str) -> None:
    """Refuse a storage file that cannot be read or written, or that is not Optuna's.

    Reads only: the file is left as it was. A missing file is fine (Optuna creates it).

    Raises:
        StudyError: naming the file and what is wrong with it.
    """
    if is_url(storage):
        if storage.startswith("sqlite:///"):
            _check_sqlite(Path(storage[len("sqlite:///") :]))
        return
    path = Path(storage)
    if path.is_dir():
        raise StudyError(f"the study storage '{path}' is a folder; give a file path or a URL")
    if not path.exists():
        return
    data = _read(path)
    if not os.access(path, os.W_OK):
        raise StudyError(f"the study storage '{path}' is not writable")
    lines = data.split(b"\n")[:-1]  # a last line without its newline is being written
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not (isinstance(entry, dict) and "op_code" in entry and "worker_id" in entry):
            raise StudyError(
                f"'{path}' is not an Optuna journal (line {number} is not a journal entry); "
                "pass hydra.sweeper.storage=NEW_PATH or move the file away"
            )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StudyError(f"cannot read the study storage '{path}': {exc.strerror}") from None


def _check_sqlite(path: Path) -> None:
    """A SQLite file must be empty or hold Optuna's tables: Optuna would add them to any other."""
    if not path.exists() or path.stat().st_size == 0:
        return
    if not _read(path).startswith(_SQLITE_MAGIC):
        raise StudyError(f"'{path}' is not a SQLite database; pass another storage URL")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        raise StudyError(f"cannot read the SQLite database '{path}': {exc}") from None
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise StudyError(
            f"'{path}' is a SQLite database without Optuna's tables; pass another storage URL"
        )


def open_storage(storage: str) -> Any:
    """The Optuna storage object for a journal path or a database URL, after checking it.

    Raises:
        StudyError: the file is not Optuna's, or the database cannot be reached.
    """
    check_storage(storage)
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if not is_url(storage):
            return JournalStorage(JournalFileBackend(storage))
        # SQLite: several processes write; wait for the lock rather than fail at once
        kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(storage, engine_kwargs=kwargs)
    except Exception as exc:  # the database's or the journal's own errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StudyError(f"cannot open the study storage '{storage}': {first}") from None


# --- the search record: <run>/<tag>/search.yaml -------------------------------------------------


def write_record(folder: Path, record: dict) -> None:
    """Write (replace) the search record of the stage folder ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / RECORD, yaml.safe_dump(record, sort_keys=False))


def read_records(run_dir: Path) -> list[dict]:
    """Every search record in a run (hidden folders skipped), with the folder it sits in."""
    records = []
    for path in sorted(run_dir.rglob(RECORD)):
        rel = path.relative_to(run_dir).parts
        if any(p.startswith(".") for p in rel):
            continue
        record = yaml.safe_load(path.read_text()) or {}
        if not (isinstance(record, dict) and record.get("storage") and record.get("study_name")):
            continue
        storage = record["storage"]
        moved = run_dir / Path(storage).name  # the run folder was moved or copied
        if not is_url(storage) and not Path(storage).exists() and moved.is_file():
            record["storage"] = str(moved)
        records.append({**record, "folder": path.parent})
    return records


# --- what a study holds, for the report ---------------------------------------------------------


@dataclass
class StudySummary:
    """A study's trials, its best trial and the parameter importances."""

    name: str
    storage: str
    direction: str
    trials: list[dict]  # number, state, value, params, retried (a killed trial run again)
    best: dict | None  # number, value, params
    importances: dict[str, float]


def summarise(storage: str, name: str) -> StudySummary:
    """Read a study: its trials in order, the best one, and Optuna's parameter importances.

    Raises:
        StudyError: the storage cannot be opened or holds no study of that name.
    """
    import optuna

    if not is_url(storage) and not Path(storage).is_file():
        raise StudyError(f"the study storage '{storage}' does not exist")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise StudyError(f"the storage '{storage}' holds no study '{name}'") from None
    trials = [
        {"number": t.number, "state": t.state.name.lower(), "value": t.value,
         "params": dict(t.params), "retried": bool(t.system_attrs.get(RETIRED))}
        for t in study.get_trials(deepcopy=False)
    ]  # fmt: skip
    complete = [t for t in trials if t["state"] == "complete"]
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": dict(b.params)}
    return StudySummary(name, storage, study.direction.name.lower(), trials, best,
                        _importances(study, len(complete)))  # fmt: skip


def _importances(study: Any, n_complete: int) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA by default); empty below 2 complete trials."""
    if n_complete < 2:
        return {}
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):  # e.g. a parameter with one value only
        return {}


def study_tables(run_dir: Path) -> list[tuple[str, tuple[list, list]]]:
    """The report's tables of each search in the run: its trials, then its importances.

    Each table is ``(columns as (key, header), rows of strings)``, as report.py prints them.
    """
    out = []
    for record in read_records(run_dir):
        s = summarise(record["storage"], record["study_name"])
        params = sorted({k for t in s.trials for k in t["params"]})
        columns = [("trial", "trial"), ("state", "state"), ("value", "value")]
        columns += [(p, p) for p in params]
        rows = [{"trial": str(t["number"]), "value": _num(t["value"]),
                 "state": t["state"] + (" (run again)" if t["retried"] else ""),
                 **{p: _num(t["params"].get(p)) for p in params}} for t in s.trials]  # fmt: skip
        best = (f"best: trial {s.best['number']}, {s.best['value']:.4g}" if s.best
                else "no trial completed")  # fmt: skip
        out.append((f"search · study {s.name} ({s.storage}) · {best}", (columns, rows)))
        if s.importances:
            rows = [{"param": k, "importance": f"{v:.3f}"} for k, v in s.importances.items()]
            header = [("param", "parameter"), ("importance", "importance")]
            out.append((f"search · study {s.name} · parameter importances", (header, rows)))
    return out


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
