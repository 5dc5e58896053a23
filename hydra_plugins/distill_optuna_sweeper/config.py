"""The sweeper's configuration, registered in Hydra's ConfigStore as ``hydra/sweeper=optuna``.

    distill-cli distill -m hydra/sweeper=distill_optuna run=demo      # conf/hydra/sweeper/
    distill-cli distill -m hparams_search=kd_logit run=demo hydra/sweeper/pruner=median

``conf/hydra/sweeper/distill_optuna.yaml`` extends this node with distill-cli's search space.
Samplers and pruners are chosen by name (``hydra/sweeper/sampler=random``); the sweeper builds
them, so this module imports neither Optuna nor distill-cli: Hydra imports it at every start.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:
    """Optuna's TPE sampler: random trials first, then a model of the results so far."""

    name: str = "tpe"
    seed: int | None = None  # seeds the proposals
    n_startup_trials: int = 10  # random trials before TPE models the results
    multivariate: bool = False  # model the parameters jointly
    constant_liar: bool = False  # treat running trials as bad: fewer duplicates in parallel


@dataclass
class RandomSamplerConf:
    """Independent uniform draws from the search space."""

    name: str = "random"
    seed: int | None = None


@dataclass
class GridSamplerConf:
    """Every combination of the ``choice``/``range`` values, once (n_trials is capped to it)."""

    name: str = "grid"
    seed: int | None = None  # the order in which the grid is visited


@dataclass
class NoPrunerConf:
    """Every trial runs all its epochs."""

    name: str = "none"


@dataclass
class MedianPrunerConf:
    """Stop a trial whose epoch's validation accuracy is below the median of earlier trials."""

    name: str = "median"
    n_startup_trials: int = 5  # finished trials before any trial is pruned
    warmup_epochs: int = 0  # epochs a trial always runs before it may be pruned
    interval_epochs: int = 1  # epochs between two pruning checks
    n_min_trials: int = 1  # trials that must have reached an epoch to compare at it


@dataclass
class DistillOptunaSweeperConf:
    """What ``hydra.sweeper`` holds; see conf/hydra/sweeper/distill_optuna.yaml for each key."""

    _target_: str = "hydra_plugins.distill_optuna_sweeper.sweeper.DistillOptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "maximize"
    storage: str | None = None  # None: <out_dir>/<run>/optuna.journal; a path or an RDB URL
    study_name: str | None = None  # None: <run>/<tag>
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    stale_after_s: float = 600.0
    params: dict[str, str] = field(default_factory=dict)


def register() -> None:
    """Put the sweeper, its samplers and its pruners into Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    provider = "distill_optuna_sweeper"
    cs.store(group="hydra/sweeper", name="optuna", node=DistillOptunaSweeperConf, provider=provider)
    for name, node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf),
                       ("grid", GridSamplerConf)):  # fmt: skip
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider=provider)
    for name, node in (("none", NoPrunerConf), ("median", MedianPrunerConf)):
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider=provider)


register()
