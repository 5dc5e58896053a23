"""The Optuna sweeper: a persistent study that survives a kill, is shared by workers, and refuses
a changed space or a file that is not a journal, on tiny glyph pretraining searches."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distill_cli.evaluation.report import report_run
from distill_cli.evaluation.study import RETIRED, StudyError, check_storage

optuna = pytest.importorskip("optuna", reason="needs optuna: pip install 'distill-cli[sweep]'")

CLI = str(Path(sys.executable).parent / "distill-cli")
SEARCH = ["pretrain", "-m", "hparams_search=lr_wd", "run=r", "dataset=glyphs_target",
          "dataset.shots=3", "model=cnn", "stage.batch_size=32", "device.threads=1"]  # fmt: skip


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """A search process; its stderr goes to a file (a full pipe would block a worker)."""
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    log = open(cwd / f"worker{time.monotonic_ns()}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen([CLI, *SEARCH, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=log, text=True, env=env)  # fmt: skip
    proc.log = log
    return proc


def wait(proc: subprocess.Popen) -> str:
    """Wait for the process; return its stderr."""
    proc.wait(timeout=300)
    proc.log.seek(0)
    return proc.log.read()


def finish(proc: subprocess.Popen) -> str:
    err = wait(proc)
    assert proc.returncode == 0, err[-3000:]
    return err


def study(tmp_path: Path) -> optuna.Study:
    storage = str(tmp_path / "outputs" / "r" / "optuna.journal")
    backend = optuna.storages.journal.JournalFileBackend(storage)
    return optuna.load_study(study_name="r/pretrain",
                             storage=optuna.storages.JournalStorage(backend))  # fmt: skip


def test_a_killed_search_reruns_to_exactly_n_trials(tmp_path, make_cfg):
    args = ("hydra.sweeper.n_trials=2", "stage.epochs=40")
    proc = start(*args, cwd=tmp_path)
    rows = tmp_path / "outputs" / "r" / "pretrain" / "trial=1" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (rows.exists() and rows.read_text().strip()):  # trial 1 is in its epochs
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish(start(*args, cwd=tmp_path))

    trials = study(tmp_path).get_trials()
    kept = [t for t in trials if not t.system_attrs.get(RETIRED)]
    assert [t.state.name for t in kept] == ["COMPLETE", "COMPLETE"]
    assert len({t.number for t in kept}) == 2 and len({t.params["optimizer.lr"] for t in kept}) == 2
    (killed,) = [t for t in trials if t.system_attrs.get(RETIRED)]
    assert killed.number == 1 and killed.state.name == "FAIL"
    (retry,) = [t for t in kept if t.user_attrs.get("retry_of") == 1]
    assert retry.params == killed.params
    assert sorted(retry.intermediate_values) == list(range(1, 41))  # each epoch's val_acc
    folder = tmp_path / "outputs" / "r" / "pretrain"
    assert (folder / f"trial={retry.number}" / "metrics.json").is_file()

    record = yaml.safe_load((folder / "search.yaml").read_text())
    best = study(tmp_path).best_trial
    assert (record["best_trial"], record["best_value"]) == (best.number, best.value)
    assert record["best_params"] == best.params

    report_run(make_cfg("stage=report", "run=r"))  # the study's tables join the report
    report = (tmp_path / "outputs" / "r" / "report.md").read_text()
    assert "study r/pretrain" in report and "fail (run again)" in report
    assert "parameter importances" in report

    before = (tmp_path / "outputs" / "r" / "optuna.journal").read_bytes()
    changed = start(*args, "optimizer.lr=interval(0.01, 0.02)", cwd=tmp_path)
    err = wait(changed)
    assert changed.returncode == 2
    assert err.count("\n") == 1 and "searches another space (differs in optimizer.lr)" in err
    assert (tmp_path / "outputs" / "r" / "optuna.journal").read_bytes() == before


def test_two_workers_share_one_study(tmp_path):
    workers = [start("hydra.sweeper.n_trials=4", "stage.epochs=15", cwd=tmp_path) for _ in "ab"]
    for w in workers:
        finish(w)
    trials = study(tmp_path).get_trials()
    kept = [t for t in trials if not t.system_attrs.get(RETIRED)]
    assert len(kept) == 4 and all(t.state.name == "COMPLETE" for t in kept)
    assert len({t.number for t in kept}) == 4
    assert len({t.system_attrs["distill_cli:worker"]["pid"] for t in kept}) == 2  # both worked
    folder = tmp_path / "outputs" / "r" / "pretrain"
    for t in kept:
        assert (folder / f"trial={t.number}" / "metrics.json").is_file()


def test_a_foreign_storage_file_is_refused_and_left_untouched(tmp_path):
    journal = tmp_path / "outputs" / "r" / "optuna.journal"
    journal.parent.mkdir(parents=True)
    journal.write_text("my notes\n")
    proc = start("hydra.sweeper.n_trials=1", "stage.epochs=1", cwd=tmp_path)
    err = wait(proc)
    assert proc.returncode == 2
    assert err.count("\n") == 1 and "is not an Optuna journal (line 1" in err
    assert journal.read_text() == "my notes\n"
    assert not (tmp_path / "outputs" / "r" / "pretrain").exists()


def test_unreadable_or_corrupt_journal_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.journal"
    garbage.write_bytes(b"\x00\xff\x13binary\n")
    with pytest.raises(StudyError, match="is not an Optuna journal"):
        check_storage(str(garbage))
    assert garbage.read_bytes() == b"\x00\xff\x13binary\n"
    with pytest.raises(StudyError, match="is a folder"):
        check_storage(str(tmp_path))
    locked = tmp_path / "locked.journal"
    locked.write_text("")
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # not as root, who reads anything
        with pytest.raises(StudyError, match="cannot read the study storage"):
            check_storage(str(locked))


def test_a_sqlite_file_without_optunas_tables_is_refused(tmp_path):
    import sqlite3

    db = tmp_path / "app.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE users (name TEXT)")
    before = db.read_bytes()
    with pytest.raises(StudyError, match="without Optuna's tables"):
        check_storage(f"sqlite:///{db}")
    assert db.read_bytes() == before
    (tmp_path / "text.db").write_text("hello")
    with pytest.raises(StudyError, match="is not a SQLite database"):
        check_storage(f"sqlite:///{tmp_path / 'text.db'}")


def test_a_trial_below_the_median_is_pruned_at_its_epoch(tmp_path, monkeypatch):
    from distill_cli.evaluation.study import TRIAL_ENV, TrialRef
    from distill_cli.search import TrialPruned, epoch_hook

    storage = str(tmp_path / "optuna.journal")
    backend = optuna.storages.journal.JournalFileBackend(storage)
    s = optuna.create_study(study_name="r/distill", direction="maximize",
                            storage=optuna.storages.JournalStorage(backend))  # fmt: skip
    done = s.ask()
    for epoch in (1, 2):
        done.report(80.0, step=epoch)
    s.tell(done, 80.0)
    trial = s.ask()
    pruner = {"name": "median", "n_startup_trials": 1, "warmup_epochs": 1}
    monkeypatch.setenv(TRIAL_ENV, TrialRef(trial.number, storage, "r/distill", pruner).to_json())
    seen = []
    hook = epoch_hook(seen.append)
    hook({"epoch": 1, "val_acc": 10.0})  # a warm-up epoch: never pruned
    with pytest.raises(TrialPruned, match="after epoch 2"):
        hook({"epoch": 2, "val_acc": 10.0})
    assert len(seen) == 2  # the tracker still got every row
    again = optuna.load_study(study_name="r/distill", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(storage)))  # fmt: skip
    assert again.trials[trial.number].intermediate_values == {1: 10.0, 2: 10.0}
    monkeypatch.delenv(TRIAL_ENV)
    tracker = seen.append
    assert epoch_hook(tracker) is tracker  # outside a search: the tracker alone
