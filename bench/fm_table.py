"""The function-matching rows of the CIFAR-10 class split as tables (docs/results.md, issue 20).

    .venv/bin/python bench/fm_table.py --shots 5 10 --seeds 0 1 2 > /tmp/fm.md

Reads what ``make cifar-split`` wrote: each run's ``eval/metrics.json`` (test top-1 of every
stage folder, ``best.pt``), ``eval_fm_val/`` and ``eval_fm_source_val/`` (the same students'
``best_val.pt``: the epoch labelled validation would have kept) and each stage's
``metrics.json`` (training seconds at one thread, steps). Prints mean ± std over seeds (sample
std), paired differences per seed, and the training CPU minutes per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime
from pathlib import Path

TAGS = ("finetune", "scratch_teacher", "distill", "distill_target", "fm_target", "fm_source",
        "scratch_student", "scratch_student_long")  # fmt: skip
PAIRS = (  # (label, minuend, subtrahend)
    ("fm_target − its teacher", "fm_target", "finetune"),
    ("distill_target − its teacher", "distill_target", "finetune"),
    ("fm_source − scratch_student", "fm_source", "scratch_student"),
    ("fm_source − scratch_student_long", "fm_source", "scratch_student_long"),
    ("fm_target − scratch_student", "fm_target", "scratch_student"),
    ("distill − scratch_student", "distill", "scratch_student"),
    ("fm_target (val pick) − its teacher", "fm_target@val", "finetune"),
    ("fm_source (val pick) − scratch_student", "fm_source@val", "scratch_student"),
)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_numbers(run: Path) -> dict[str, float]:
    """Test top-1 per tag; ``<tag>@val`` for the best_val.pt picks."""
    found = {tag: r["top1"] for tag, r in _read(run / "eval" / "metrics.json").items()}
    for folder, tag in (("eval_fm_val", "fm_target"), ("eval_fm_source_val", "fm_source")):
        for r in _read(run / folder / "metrics.json").values():
            found[f"{tag}@val"] = r["top1"]
    return found


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f} (1 seed)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main() -> None:
    """Print the tables."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--outputs", default="outputs")
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10, 50, 250])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    runs = {k: {s: Path(args.outputs) / f"cifar_split_k{k}_seed{s}" for s in args.seeds}
            for k in args.shots}  # fmt: skip
    numbers = {k: {s: run_numbers(r) for s, r in by_seed.items()} for k, by_seed in runs.items()}
    head = "| | " + " | ".join(f"{k}/class" for k in args.shots) + " |"
    rule = "|---|" + "---:|" * len(args.shots)
    print("Test top-1, mean ± std over seeds:\n\n" + head + "\n" + rule)
    for tag in (*TAGS, "fm_target@val", "fm_source@val"):
        cells = [_fmt([n[tag] for n in numbers[k].values() if tag in n]) for k in args.shots]
        print(f"| {tag} | " + " | ".join(cells) + " |")
    print("\nPaired differences (the same seed's runs), mean ± std:\n\n" + head + "\n" + rule)
    for label, a, b in PAIRS:
        cells = [_fmt([n[a] - n[b] for n in numbers[k].values() if a in n and b in n])
                 for k in args.shots]  # fmt: skip
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        "\nMinutes per stage at one thread, mean over seeds: training (the fit loop) / wall"
        " (start to finish, data and validation included):\n\n" + head + "\n" + rule
    )
    for tag in TAGS:
        cells = []
        for k in args.shots:
            train = [_read(r / tag / "metrics.json").get("train_time_s") for r in runs[k].values()]
            wall = [_wall(r / tag / "manifest.json") for r in runs[k].values()]
            train, wall = [t for t in train if t is not None], [w for w in wall if w is not None]
            cells.append(f"{statistics.mean(train) / 60:.1f} / {statistics.mean(wall) / 60:.1f}"
                         if train and wall else "–")  # fmt: skip
        print(f"| {tag} | " + " | ".join(cells) + " |")


def _wall(manifest: Path) -> float | None:
    """Seconds from a stage's start to its finish, from its manifest."""
    m = _read(manifest)
    if not m.get("finished"):
        return None
    start, end = (
        datetime.fromisoformat(m[k].replace("+0000", "+00:00")) for k in ("started", "finished")
    )
    return (end - start).total_seconds()


if __name__ == "__main__":
    main()
