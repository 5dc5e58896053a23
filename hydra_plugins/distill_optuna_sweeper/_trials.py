"""Which trials count toward n_trials, whose they are, and what happens to a dead worker's trials.

Every worker (a ``distill-cli -m`` process) marks the trials it asks with its host, process id and
start time, and beats a heartbeat into them while they run. A RUNNING trial whose worker died (on
this machine: its process is gone; elsewhere: silent for ``stale_after_s``) is failed, marked
retired, and its parameters are queued again. The study's numbers are handed out one by one by
the storage, so a trial's place among the kept trials decides whether it fits in n_trials: a
surplus one (two workers asking at once for the last place) is retired before it runs.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from distill_cli.evaluation.study import RETIRED

WORKER = "distill_cli:worker"  # system attr: {"host", "pid", "started"} of the asking process
HEARTBEAT = "distill_cli:heartbeat"  # system attr: time.time() of the worker's last beat
RETRY_OF = "retry_of"  # user attr of a queued retry: the number of the trial it runs again


def me() -> dict:
    """This process, as recorded in the trials it asks."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid())}


def _started(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), telling reused pids apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(worker: dict) -> bool:
    """Whether a worker process on this machine still runs."""
    try:
        os.kill(int(worker["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = worker.get("started")
    return started is None or _started(int(worker["pid"])) == started


class Book:
    """The study's trials as one worker sees them: counting, asking, retiring."""

    def __init__(self, study: Any, storage: Any, n_trials: int, stale_after_s: float) -> None:
        self.study, self.storage = study, storage
        self.n_trials, self.stale_after_s = n_trials, stale_after_s
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.worker = me()

    def trials(self) -> list:
        return self.study.get_trials(deepcopy=False)

    def kept(self, trials: list | None = None) -> list:
        """Trials that count toward n_trials: not retired, one per retried trial."""
        seen, out = set(), []
        for t in trials if trials is not None else self.trials():
            if t.system_attrs.get(RETIRED):
                continue
            origin = t.user_attrs.get(RETRY_OF)
            if origin is not None:
                if origin in seen:  # two workers queued the same retry: the first counts
                    continue
                seen.add(origin)
            out.append(t)
        return out

    def done(self) -> int:
        """Kept trials that have ended (complete, pruned or failed)."""
        return sum(t.state.is_finished() for t in self.kept())

    def full(self) -> bool:
        """No place left for a new trial, and no queued retry waiting."""
        kept = self.kept()
        return len(kept) >= self.n_trials and not any(t.state.name == "WAITING" for t in kept)

    def running_elsewhere(self) -> bool:
        return any(t.state.name == "RUNNING" for t in self.kept())

    def fits(self, number: int) -> bool:
        """Whether the trial ``number`` (just asked) has a place among the first n_trials."""
        kept = self.kept()
        return any(t.number == number for t in kept) and (
            sum(t.number <= number for t in kept) <= self.n_trials
        )

    def claim(self, number: int) -> None:
        """Mark a trial this worker asked for as its own."""
        tid = self._id(number)
        self.storage.set_trial_system_attr(tid, WORKER, self.worker)
        self.storage.set_trial_system_attr(tid, HEARTBEAT, time.time())

    def retire(self, number: int, why: str, retry: bool) -> bool:
        """Fail a trial that must not count; queue its parameters again if ``retry``.

        Returns whether this worker retired it (another may have been first).
        """
        from optuna.trial import TrialState

        frozen = self.storage.get_trial(self._id(number))
        if frozen.state.is_finished():
            return False
        try:
            self.storage.set_trial_system_attr(frozen._trial_id, RETIRED, why)
            self.study.tell(number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished meanwhile, by its worker or another
            return False
        if retry and frozen.params:
            self.study.enqueue_trial(frozen.params, user_attrs={RETRY_OF: number})
        return True

    def retire_stale(self) -> list[int]:
        """Fail and queue again the RUNNING trials whose worker is gone; return their numbers."""
        host, now, out = socket.gethostname(), time.time(), []
        for t in self.trials():
            if t.state.name != "RUNNING":
                continue
            worker = t.system_attrs.get(WORKER)
            if worker and worker.get("host") == host:
                stale = not _alive(worker)
            else:
                beat = t.system_attrs.get(HEARTBEAT) or t.datetime_start.timestamp()
                stale = now - beat > self.stale_after_s
            if stale and self.retire(t.number, "stale", retry=True):
                out.append(t.number)
        return out

    @contextmanager
    def beating(self, numbers: list[int]) -> Iterator[None]:
        """Beat the heartbeat of these trials while the block runs."""
        stop = threading.Event()
        ids = [self._id(n) for n in numbers]

        def beat() -> None:
            while not stop.wait(max(1.0, self.stale_after_s / 10)):
                for tid in ids:
                    try:
                        self.storage.set_trial_system_attr(tid, HEARTBEAT, time.time())
                    except Exception:  # finished meanwhile: nothing to keep alive
                        pass

        thread = threading.Thread(target=beat, name="trial-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
