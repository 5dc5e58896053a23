"""What every benchmark script ends with: its settings, and one JSON document printed and saved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def settings(args: argparse.Namespace) -> dict:
    """The command-line arguments as JSON values."""
    return vars(args) | {"out": str(args.out) if args.out else None}


def emit(report: dict, out: Path | None) -> None:
    """Print ``report`` as indented JSON and write it to ``out`` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
