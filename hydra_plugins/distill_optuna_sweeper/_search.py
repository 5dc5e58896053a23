"""One worker's search: open the study, ask trials in batches, launch them, tell their results.

The loop ends when the study holds n_trials kept trials and none of them still runs: a worker
whose own trials are done waits for the others' (and runs a retry if one of them dies).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distill_cli import rundir
from distill_cli.evaluation.study import (
    JOURNAL,
    PRUNED,
    TRIAL_ENV,
    StudyError,
    TrialRef,
    is_url,
    open_storage,
    trial_folder,
    write_record,
)
from hydra_plugins.distill_optuna_sweeper import _space
from hydra_plugins.distill_optuna_sweeper._trials import Book

log = logging.getLogger("distill_cli.sweep")
SPACE_ATTR = "distill_cli:space"  # study user attr: the space the study searches (JSON per key)
_POLL_S = 1.0  # how often a worker with nothing to ask looks at the others' trials


class Search:
    """The search one ``distill-cli -m`` process runs on a shared study."""

    def __init__(self, conf: DictConfig, config: DictConfig, launcher: Any,
                 arguments: list[str]) -> None:  # fmt: skip
        self.conf, self.launcher = conf, launcher
        self.space, fixed = _space.parse(conf.params or {}, arguments)
        run, _ = rundir.resolve_run(config.out_dir, config.run, new=config.stage.name == "pretrain")
        tag = config.tag or config.stage.name
        self.fixed = [f for f in fixed if not f.startswith("run=")] + [f"run={run}"]
        self.folder = Path(config.out_dir) / run / tag
        storage = conf.storage or str(Path(config.out_dir) / run / JOURNAL)
        # a journal by its absolute path: the jobs and `report` may run from elsewhere
        self.storage_url = storage if is_url(storage) else str(Path(storage).absolute())
        self.name = conf.study_name or f"{run}/{tag}"
        self.n_trials = int(conf.n_trials)
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.job_idx = 0

    def open(self) -> None:
        """Create the study or continue it; refuse one that searches another space."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if conf_direction(self.conf) not in ("maximize", "minimize"):
            raise StudyError(f"hydra.sweeper.direction={self.conf.direction} must be maximize or "
                             "minimize")  # fmt: skip
        if not is_url(self.storage_url):
            Path(self.storage_url).parent.mkdir(parents=True, exist_ok=True)
        self.storage = open_storage(self.storage_url)
        sampler = self._sampler(None)
        try:  # loading writes nothing: a refused rerun leaves the storage as it was
            self.study = optuna.load_study(study_name=self.name, storage=self.storage,
                                           sampler=sampler)  # fmt: skip
        except KeyError:
            self.study = optuna.create_study(storage=self.storage, study_name=self.name,
                                             sampler=sampler, direction=conf_direction(self.conf),
                                             load_if_exists=True)  # fmt: skip
        self._check_study()
        if self.conf.sampler.name == "grid":
            size = math.prod(len(v) for v in _space.grid(self.space).values())
            self.n_trials = min(self.n_trials, size)
        self.book = Book(self.study, self.storage, self.n_trials, float(self.conf.stale_after_s))
        write_record(self.folder, self._record())

    def _check_study(self) -> None:
        study, mine = self.study, _space.signature(self.space)
        if study.direction.name.lower() != conf_direction(self.conf):
            raise StudyError(f"the study '{self.name}' in '{self.storage_url}' is to "
                             f"{study.direction.name.lower()}; name a new study: "
                             "hydra.sweeper.study_name=NEW")  # fmt: skip
        stored = study.user_attrs.get(SPACE_ATTR)
        if stored is None:
            study.set_user_attr(SPACE_ATTR, mine)
        elif stored != mine:
            keys = sorted(k for k in stored.keys() | mine.keys() if stored.get(k) != mine.get(k))
            raise StudyError(
                f"the study '{self.name}' in '{self.storage_url}' searches another space "
                f"(differs in {', '.join(keys)}); rerun with its space, or name a new study: "
                "hydra.sweeper.study_name=NEW"
            )

    def run(self) -> None:
        """Ask, launch and tell until the study holds n_trials kept trials, none running."""
        self.open()
        done = self.book.done()
        log.info("study '%s' in %s: %d of %d trials done", self.name, self.storage_url, done,
                 self.n_trials)  # fmt: skip
        while True:
            retried = self.book.retire_stale()
            if retried:
                log.info("trial(s) %s were left running by a worker that is gone: they run again",
                         ", ".join(map(str, retried)))  # fmt: skip
            batch = self._ask_batch()
            if batch:
                self._launch(batch)
            elif not self.book.running_elsewhere():
                break
            else:
                time.sleep(_POLL_S)
        self.finish()

    def _ask_batch(self) -> list[tuple[int, list[str]]]:
        """Up to n_jobs new trials that fit in n_trials, each with its overrides."""
        batch = []
        while len(batch) < int(self.conf.n_jobs) and not self.book.full():
            trial = self.study.ask()
            if not self.book.fits(trial.number):
                self.book.retire(trial.number, "surplus", retry=False)
                break
            self.book.claim(trial.number)
            self.study.sampler = self._sampler(trial.number)  # seeded by the trial's number
            batch.append((trial.number, _space.suggest(trial, self.space)))
        return batch

    def _launch(self, batch: list[tuple[int, list[str]]]) -> None:
        """Run a batch through the launcher and tell the study each result."""
        numbers = [n for n, _ in batch]
        jobs = [[*self.fixed, *params, self._env(n)] for n, params in batch]
        log.info("trial(s) %s: %s", ", ".join(map(str, numbers)),
                 "; ".join(" ".join(p) for _, p in batch))  # fmt: skip
        try:
            with self.book.beating(numbers):
                returns = self.launcher.launch(jobs, initial_job_idx=self.job_idx)
        except BaseException:  # Ctrl-C, SIGTERM: these trials run again next time
            for n in numbers:
                self.book.retire(n, "stale", retry=True)
            raise
        self.job_idx += len(returns)
        failed = [r for n, r in zip(numbers, returns, strict=True) if not self._tell(n, r)]
        if failed and len(failed) / len(returns) > float(self.conf.max_failure_rate):
            log.error("%d of %d trials of the batch failed (max_failure_rate=%s): the search "
                      "stops", len(failed), len(returns), self.conf.max_failure_rate)  # fmt: skip
            for r in failed:
                r.return_value  # noqa: B018  (re-raises a job's own exception, as Hydra does)
            raise SystemExit(1)

    def _tell(self, number: int, ret: Any) -> bool:
        """Record one trial's end; return False when it failed."""
        from optuna.trial import TrialState

        value = ret.return_value if ret.status.name == "COMPLETED" else None
        if value == PRUNED:
            state, values = TrialState.PRUNED, None
        elif isinstance(value, (int, float)) and math.isfinite(value):
            state, values = TrialState.COMPLETE, [float(value)]
        else:
            state, values = TrialState.FAIL, None
        frozen = self.study.tell(number, state=state, values=values, skip_if_finished=True)
        log.info("trial %d: %s%s", number, frozen.state.name.lower(),
                 f" {frozen.value:.4g}" if frozen.value is not None else "")  # fmt: skip
        return state != TrialState.FAIL

    def _env(self, number: int) -> str:
        """The override that tells a trial's job its study (pruning reports go there)."""
        ref = TrialRef(number, self.storage_url, self.name,
                       OmegaConf.to_container(self.conf.pruner))  # fmt: skip
        quoted = "'" + ref.to_json().replace("'", "\\'") + "'"
        return f"++hydra.job.env_set.{TRIAL_ENV}={quoted}"

    def _sampler(self, number: int | None) -> Any:
        """The configured sampler; for a trial, seeded with seed + its number.

        Draws then differ across workers and reruns, and repeat for the same trial number.
        """
        import optuna

        s = OmegaConf.to_container(self.conf.sampler)
        name, seed = s.pop("name"), s.pop("seed", None)
        if name == "grid":
            if number is not None:
                return self.study.sampler
            try:
                return optuna.samplers.GridSampler(_space.grid(self.space), seed=seed)
            except ValueError as exc:
                raise StudyError(str(exc)) from None
        seed = None if seed is None or number is None else seed + number
        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
        if name not in samplers:
            raise StudyError(f"unknown sampler '{name}'; valid: grid, random, tpe")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant_liar is experimental
            return samplers[name](seed=seed, **s)

    def _record(self) -> dict:
        return {"study_name": self.name, "storage": self.storage_url,
                "direction": conf_direction(self.conf), "n_trials": self.n_trials,
                "params": {k: str(v) for k, v in (self.conf.params or {}).items()},
                "fixed": self.fixed}  # fmt: skip

    def finish(self) -> None:
        """Print the best trial; write it into search.yaml and the sweep folder."""
        from distill_cli import console

        kept = self.book.kept()
        complete = [t for t in kept if t.state.name == "COMPLETE"]
        counts = {s: sum(t.state.name == s for t in kept) for s in ("COMPLETE", "PRUNED", "FAIL")}
        log.info("study '%s': %d trials (%d complete, %d pruned, %d failed)", self.name,
                 len(kept), *counts.values())  # fmt: skip
        if not complete:
            log.warning("no trial completed: no best parameters")
            return
        best = self.study.best_trial
        record = {**self._record(), "best_trial": best.number, "best_value": best.value,
                  "best_params": dict(best.params),
                  "best_folder": str(self.folder / trial_folder(best.number))}  # fmt: skip
        write_record(self.folder, record)
        results = {"name": "optuna", "best_params": dict(best.params), "best_value": best.value}
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), self.sweep_dir / "optimization_results.yaml")
        console.print_summary(f"best trial · study {self.name}",
                              {"trial": best.number, "value": best.value, **best.params,
                               "folder": record["best_folder"]})  # fmt: skip


def conf_direction(conf: DictConfig) -> str:
    return str(conf.direction).lower()
