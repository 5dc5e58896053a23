"""Wall time of one search run by 1 worker, then by N workers sharing its study.

    .venv/bin/python bench/sweep_workers.py                 # 8 trials, 1 then 2 workers
    .venv/bin/python bench/sweep_workers.py --trials 12 --workers 3 --epochs 30

Each worker is a ``distill-cli pretrain -m hparams_search=lr_wd`` process on the same run (one
thread each, device.threads=1); they share the run's optuna.journal. Runs in a temporary folder.
The speed-up is bounded by the cores free: other processes on the machine slow the N workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench")
CLI = str(Path(sys.executable).parent / "distill-cli")


def search(cwd: Path, run: str, workers: int, trials: int, epochs: int) -> float:
    """Start ``workers`` processes on one study; return the seconds until the last one ends."""
    args = [CLI, "pretrain", "-m", "hparams_search=lr_wd", f"run={run}",
            f"hydra.sweeper.n_trials={trials}", "dataset=glyphs_target", "dataset.shots=10",
            "model=cnn", "stage.batch_size=32", f"stage.epochs={epochs}",
            "device.threads=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [cwd / f"{run}_{i}.log" for i in range(workers)]  # a pipe left unread would block
    start = time.perf_counter()
    procs = [subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(path, "w")) for path in logs]  # noqa: SIM115  # fmt: skip
    for p, path in zip(procs, logs, strict=True):
        if p.wait() != 0:
            raise SystemExit(f"a worker failed: {path.read_text().strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def main() -> None:
    """Parse the options, time both searches, print the two times and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        one = search(Path(tmp), "one_worker", 1, a.trials, a.epochs)
        many = search(Path(tmp), "workers", a.workers, a.trials, a.epochs)
    log.info("%d trials: 1 worker %.1f s, %d workers %.1f s (speed-up %.2fx; ideal %dx)",
             a.trials, one, a.workers, many, one / many, a.workers)  # fmt: skip


if __name__ == "__main__":
    main()
