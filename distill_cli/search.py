"""A search trial's side of pruning: each epoch's validation accuracy goes to the Optuna study.

    distill-cli distill -m hparams_search=kd_logit run=demo hydra/sweeper/pruner=median

The sweeper tells each trial's job its study and number (``study.TRIAL_ENV``); outside a search
:func:`epoch_hook` changes nothing. A trial the pruner stops raises :class:`TrialPruned` after
its epoch's row is written; the job returns ``study.PRUNED`` and the sweeper records the trial
as pruned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distill_cli.evaluation.study import TrialRef, open_storage
from distill_cli.training import Interrupted


class TrialPruned(Interrupted):
    """The study's pruner stopped this trial; its stage folder keeps what it trained."""

    status = "pruned"  # a search's outcome, not a failure: report lists it apart


def epoch_hook(on_epoch: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """``on_epoch``, followed in a search trial by the report to the study and the prune check."""
    ref = TrialRef.from_env()
    if ref is None:
        return on_epoch
    trial = _Trial(ref)

    def hook(row: dict) -> None:
        if on_epoch is not None:
            on_epoch(row)
        trial.report(row)

    return hook


class _Trial:
    """The study's trial, opened at the first validated epoch."""

    def __init__(self, ref: TrialRef) -> None:
        self.ref, self.trial = ref, None

    def report(self, row: dict) -> None:
        if row.get("val_acc") is None:
            return
        if self.trial is None:
            self.trial = self._open()
        self.trial.report(float(row["val_acc"]), step=int(row["epoch"]))
        if self.trial.should_prune():
            raise TrialPruned(f"pruned by Optuna after epoch {row['epoch']} "
                              f"(val_acc {row['val_acc']:.2f})")  # fmt: skip

    def _open(self) -> Any:
        import warnings

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.ref.storage)
        study = optuna.load_study(study_name=self.ref.study, storage=storage,
                                  sampler=optuna.samplers.RandomSampler(),
                                  pruner=make_pruner(self.ref.pruner))  # fmt: skip
        study_id = storage.get_study_id_from_name(self.ref.study)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.ref.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.trial.Trial(study, trial_id)


def make_pruner(conf: dict) -> Any:
    """The pruner named in the sweeper's config (``hydra/sweeper/pruner=none|median``).

    Steps are epochs (from 1): ``warmup_epochs`` of them always run.
    """
    import optuna

    opts = dict(conf or {"name": "none"})
    name = opts.pop("name", "none")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=opts.get("n_startup_trials", 5),
            n_warmup_steps=opts.get("warmup_epochs", 0) + 1,
            interval_steps=opts.get("interval_epochs", 1),
            n_min_trials=opts.get("n_min_trials", 1),
        )
    raise ValueError(f"unknown pruner '{name}'; valid: median, none")
