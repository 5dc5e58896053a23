"""The Hydra sweeper plugin: an Optuna (>= 4) search over a persistent, shared study.

    distill-cli distill -m hydra/sweeper=distill_optuna run=demo hydra.sweeper.n_trials=20
    distill-cli distill -m hparams_search=kd_logit run=demo    # rerun: the study continues

Hydra imports this module at every start: Optuna and the search loop load in :meth:`sweep`.
"""

import logging
import sys
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class DistillOptunaSweeper(Sweeper):
    """Asks Optuna for trials, hands them to the launcher in batches, tells it the results."""

    def __init__(self, **conf: Any) -> None:
        self.conf = OmegaConf.create(conf)
        self.config: DictConfig | None = None
        self.launcher = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:  # fmt: skip
        """Keep the config and build the launcher the trials run with."""
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def sweep(self, arguments: list[str]) -> None:
        """Run this worker's part of the search; a user error ends in one line, exit code 2."""
        from distill_cli import console
        from distill_cli.evaluation.study import StudyError
        from distill_cli.rundir import CheckpointError
        from hydra_plugins.distill_optuna_sweeper._search import Search

        _log_to_console()
        try:
            Search(self.conf, self.config, self.launcher, arguments).run()
        except (StudyError, CheckpointError) as exc:
            console.print_error(str(exc))
            sys.exit(2)


def _log_to_console() -> None:
    """The search's own log lines, on the console (stage logs go to each trial's folder)."""
    from distill_cli import console

    log = logging.getLogger("distill_cli.sweep")
    if not log.handlers:
        log.addHandler(console.log_handler())
    log.setLevel(logging.INFO)
    log.propagate = False
