"""Experiment trackers: each epoch's metrics and the resolved config in TensorBoard or MLflow.

    distill-cli pretrain logger=tensorboard run=demo   # then: tensorboard --logdir outputs/demo
    distill-cli distill -m logger=mlflow run=demo kd.temperature=1,4

A tracker gets the rows :func:`training.fit` writes to metrics.jsonl, which stays the record: a
tracker that fails mid-run logs one warning and stops, training goes on. The packages are
imported only when their tracker is opened.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill_cli.rundir import flatten

log = logging.getLogger("distill_cli")
# anything else: FAILED
_MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "pruned": "KILLED"}


class TrackerError(Exception):
    """A tracker that cannot start (its package is missing, its store refuses); one line."""


class Tracker:
    """The ``none`` tracker, and the interface of the others: ``log_epoch`` and ``close``."""

    name = "none"
    run_id: str | None = None  # what a resumed stage needs to continue the same tracker run
    failed = False

    def log_epoch(self, row: dict) -> None:
        """Record one epoch's metrics row (``epoch`` is the step); never raises."""
        if self.failed:
            return
        try:
            self._log(row["epoch"], _scalars(row))
        except Exception as exc:  # a view of metrics.jsonl must not stop the training
            log.warning("%s: %s; it gets no more epochs (metrics.jsonl has them all)",
                        self.name, _first_line(exc))  # fmt: skip
            self.failed = True

    def close(self, status: str = "completed") -> None:
        """Flush and end the tracker run with the stage's status; safe to call twice."""

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        """Write one epoch's scalars; the ``none`` tracker writes nothing."""


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir``: one scalar per metric and the config as a text summary."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, config: dict, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrackerError(_missing("tensorboard", "tensorboard")) from None
        # purge_step drops events from that epoch on, written before a stop that is now resumed
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self.writer.add_text("config", _indent(_yaml(config)))

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, status: str = "completed") -> None:
        """Flush the event file and close it."""
        self.writer.close()


class MLflowTracker(Tracker):
    """One MLflow run: the flattened config as params and config.yaml, metrics by epoch."""

    name = "mlflow"

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str, config: dict,
        tags: dict[str, str] | None = None, run_id: str | None = None,
    ) -> None:  # fmt: skip
        try:
            import mlflow
            from mlflow.entities import Param
        except ImportError:
            raise TrackerError(_missing("mlflow", "mlflow-skinny")) from None
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store's set-up chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.closed = False
        try:
            with _store_lock(tracking_uri), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # SQLAlchemy's, in MLflow
                self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
                if run_id is None:
                    experiment_id = self._experiment(experiment, tracking_uri)
                    run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                    tags=tags or {}).info.run_id  # fmt: skip
                    params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
                    for i in range(0, len(params), 100):  # at most 100 params per batch
                        self.client.log_batch(run_id, params=params[i : i + 100])
                    self.client.log_dict(run_id, config, "config.yaml")
                else:  # a resumed stage continues its run
                    self.client.update_run(run_id, status="RUNNING")
        except Exception as exc:
            raise TrackerError(f"mlflow at {tracking_uri}: {_first_line(exc)}") from None
        self.run_id = run_id

    def _experiment(self, name: str, tracking_uri: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        artifacts = None
        if tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the local database
            artifacts = (_sqlite_path(tracking_uri).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=artifacts)

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "completed") -> None:
        """End the MLflow run: FINISHED, KILLED (interrupted) or FAILED."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):  # a tracker never hides the stage's own outcome
            self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS.get(status, "FAILED"))


def open_tracker(kind: str, folder: Path, run_name: str, config: dict, **opts: Any) -> Tracker:
    """Open the tracker ``kind`` for a stage folder.

    Args:
        kind: none, tensorboard or mlflow.
        folder: the stage folder.
        run_name: the tracker run's name: the stage folder within the run, ``distill/seed=1``.
        config: the resolved configuration, plain types.
        **opts: tensorboard: ``dir`` (inside ``folder``), ``purge_step``; mlflow:
            ``tracking_uri``, ``experiment``, ``tags``, ``run_id`` (continue that run).

    Raises:
        TrackerError: the tracker's package is missing or its store cannot be opened.
    """
    if kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(folder / opts.get("dir", "tensorboard"), config,
                                  opts.get("purge_step"))  # fmt: skip
    if kind == "mlflow":
        uri = opts["tracking_uri"]
        if uri.startswith("sqlite:///"):
            _sqlite_path(uri).parent.mkdir(parents=True, exist_ok=True)
        return MLflowTracker(uri, opts.get("experiment") or run_name, run_name, config,
                             opts.get("tags"), opts.get("run_id"))  # fmt: skip
    raise ValueError(f"unknown logger '{kind}'; valid: none, tensorboard, mlflow")


def _scalars(row: dict) -> dict[str, float]:
    """The row's numbers, except the epoch (the step)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def _indent(text: str) -> str:
    """TensorBoard renders text as Markdown: four spaces keep the YAML a code block."""
    return "".join(f"    {line}\n" for line in text.splitlines())


def _sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///") :])


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise creating a local SQLite store and its experiment across parallel jobs."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no parallel local launcher to guard against
        yield
        return
    with open(f"{_sqlite_path(uri)}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _missing(kind: str, package: str) -> str:
    return f"logger={kind} needs the {package} package: pip install 'distill-cli[track]'"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
