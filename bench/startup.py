"""Start-up time of the console script: ``--help`` and ``distill --cfg job``, nothing trained.

    .venv/bin/python bench/startup.py                       # 5 runs of each, JSON on stdout
    .venv/bin/python bench/startup.py --runs 9 --out startup.json
    PYTHONPATH=../other-checkout .venv/bin/python bench/startup.py   # time another checkout

Each run is a fresh process started with ``subprocess``, in an empty temporary folder, timed
from start to exit; one untimed run per command first compiles the bytecode. The report gives
each command's median, fastest and slowest run, and every run. On a shared machine the numbers
move with the load: compare two checkouts back to back, never with a figure from another day.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CLI, emit, settings

COMMANDS = {"help": ["--help"], "cfg_job": ["distill", "--cfg", "job"]}


def timed(cli: str, args: list[str], cwd: str) -> float:
    """Wall time of one ``cli args`` process in seconds; exits if the command fails."""
    start = time.perf_counter()
    proc = subprocess.run([cli, *args], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {cli} {' '.join(args)}\n{proc.stderr[-3000:]}")
    return elapsed


def measure(cli: str, args: list[str], runs: int, warmup: int) -> dict:
    """Median and range of ``runs`` timed runs after ``warmup`` untimed ones."""
    with tempfile.TemporaryDirectory(prefix="distill-startup-") as cwd:
        for _ in range(warmup):
            timed(cli, args, cwd)
        times = [timed(cli, args, cwd) for _ in range(runs)]
    return {
        "command": " ".join(["distill-cli", *args]),
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "runs_s": [round(t, 3) for t in times],
    }


def main() -> None:
    """Time both commands and print (and write) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per command first")
    parser.add_argument("--cli", default=CLI, help="the console script to time")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    report = {
        "settings": settings(args),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "startup": {
            name: measure(args.cli, argv, args.runs, args.warmup) for name, argv in COMMANDS.items()
        },
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
