"""What the benchmark scripts share: running the console script, settings, one JSON report."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "distill-cli")


def settings(args: argparse.Namespace) -> dict:
    """The command-line arguments as JSON values."""
    return vars(args) | {"out": str(args.out) if args.out else None}


def emit(report: dict, out: Path | None) -> None:
    """Print ``report`` as indented JSON and write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def run(out: Path, *args: str) -> float:
    """Run the console script in ``out``; return its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run([CLI, *args, f"out_dir={out}"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: distill-cli {' '.join(args)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def subset(data: Path, root: Path, classes: int, per_class: int) -> None:
    """Links the first ``per_class`` images of the first ``classes`` classes into ``root/train``.

    The decoded-image cache then lives in ``root``, never in the shared data folder.
    """
    for folder in sorted(p for p in (data / "train").iterdir() if p.is_dir())[:classes]:
        target = root / "train" / folder.name
        target.mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            (target / image.name).symlink_to(image.resolve())
