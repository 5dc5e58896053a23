r"""Fewer teacher passes: accuracy and time of ``stage.aug_views=K`` against a fresh view per epoch.

    make bench-views      # the demo's glyphs, then CIFAR-10 (~30 min on 2 quiet cores)
    .venv/bin/python bench/aug_views.py --data glyphs --views 1,2,4,8,16,none --seeds 0,1,2 \
        --out docs/bench_aug_views_glyphs.json                                       # ~6 min
    .venv/bin/python bench/aug_views.py --data data/cifar10_jpeg --views 1,2,4,8,none \
        --seeds 0,1 --out docs/bench_aug_views_cifar10.json                          # ~25 min
    .venv/bin/python bench/aug_views.py --data glyphs --views 1,none --seeds 0 --epochs 2 \
        --teacher-epochs 1 --finetune-epochs 1                                       # a smoke run

With the teacher cache (the default), ``stage.aug_views=K`` gives each image K augmentations
(crop offset, flip), epoch e showing view e mod K: the teacher runs in the first K epochs only
and every later epoch reads its outputs from the cache. ``none`` (``aug_views=null``, the
default) draws a fresh view every epoch, so the teacher runs on every step. Fewer views cost
the student augmentation diversity; this measures what that costs in accuracy and saves in time.

- ``glyphs``: the demo's recipe (``make demo``): ``resnet8x4`` pretrained on ``glyphs_source``,
  finetuned on 5 labelled ``glyphs_target`` images per class, distilled into ``cnn_padded`` for
  400 epochs of batch 32 with 4-pixel crops, lr 0.05.
- an image folder (CIFAR-10): ``--classes`` x ``--per-class`` images linked into a temporary
  folder, ``--val-per-class`` of each class held out; ``resnet8x4`` pretrained on the rest for
  ``--teacher-epochs``, distilled into ``cnn`` for ``--epochs`` with crops and flips.

Each (K, seed) job runs in a run of its own, so its teacher cache starts cold and its time is
what a user's first job costs. Per K: best and last validation accuracy and training time
(``train_time_s``, validation excluded), mean and std over the seeds, and the time relative to
``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import emit, run, settings, subset

BATCH_32 = "stage.batch_size=32"
GLYPHS = {  # make demo's settings
    "pretrain": ["dataset=glyphs_source", "model=resnet8x4"],
    "finetune": ["dataset=glyphs_target", "dataset.shots=5", BATCH_32, "optimizer.lr=0.03"],
    "student": ["model=cnn_padded", "dataset.crop_padding=4", BATCH_32, "optimizer.lr=0.05"],
}


def teacher(out: Path, a: argparse.Namespace) -> Path:
    """Trains the teacher; returns its stage folder."""
    if a.data == "glyphs":
        run(out, "pretrain", "run=t", *GLYPHS["pretrain"], f"stage.epochs={a.teacher_epochs}")
        run(out, "finetune", "run=t", *GLYPHS["finetune"], f"stage.epochs={a.finetune_epochs}")
        return out / "t" / "finetune"
    root = out.parent / "images"
    subset(Path(a.data), root, a.classes, a.per_class)
    run(out, "pretrain", "run=t", "dataset=imagefolder", f"dataset.root={root}",
        f"dataset.val_per_class={a.val_per_class}", "dataset.crop_padding=4", "dataset.flip=true",
        "model=resnet8x4", f"stage.epochs={a.teacher_epochs}")  # fmt: skip
    return out / "t" / "pretrain"


def student_job(out: Path, folder: Path, views: str, seed: int, a) -> dict:
    """One distill job in a run of its own; its final metrics and cache statistics."""
    name = f"v{views}_s{seed}"
    args = GLYPHS["student"] if a.data == "glyphs" else ["model=cnn"]
    k = "null" if views == "none" else views
    wall = run(out, "distill", f"run={name}", f"stage.from={folder}", *args, f"seed={seed}",
               f"stage.epochs={a.epochs}", f"stage.aug_views={k}")  # fmt: skip
    stage = out / name / "distill"
    final = json.loads((stage / "metrics.json").read_text())
    manifest = json.loads((stage / "manifest.json").read_text())
    return {
        "best_val_acc": final["best_val_acc"], "last_val_acc": final["last_val_acc"],
        "train_time_s": final["train_time_s"], "wall_s": round(wall, 2),
        "hit_rate": manifest.get("teacher_cache", {}).get("hit_rate"),
    }  # fmt: skip


def summarise(jobs: list[dict]) -> dict:
    """Mean and sample std over the seeds of each number."""
    out = {}
    for key in ("best_val_acc", "last_val_acc", "train_time_s", "wall_s", "hit_rate"):
        values = [j[key] for j in jobs if j[key] is not None]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            out[key] = {"mean": round(statistics.mean(values), 3), "std": round(std, 3)}
    return out


def main() -> None:
    """Train the teacher, run every (views, seed) job, write one JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="glyphs", help="glyphs, or an image folder (CIFAR-10)")
    p.add_argument("--views", default="1,2,4,8,none", help="stage.aug_views values; none = null")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (glyphs 400, else 20)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="glyphs 5, else 15")
    p.add_argument("--finetune-epochs", type=int, default=60, help="glyphs only")
    p.add_argument("--classes", type=int, default=10, help="image folder only")
    p.add_argument("--per-class", type=int, default=600, help="image folder only")
    p.add_argument("--val-per-class", type=int, default=100, help="image folder only")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    glyphs = a.data == "glyphs"
    a.epochs = a.epochs or (400 if glyphs else 20)
    a.teacher_epochs = a.teacher_epochs or (5 if glyphs else 15)
    views, seeds = a.views.split(","), [int(s) for s in a.seeds.split(",")]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "outputs"
        start = time.perf_counter()
        folder = teacher(out, a)
        teacher_s = round(time.perf_counter() - start, 1)
        teacher_acc = json.loads((folder / "metrics.json").read_text())["best_val_acc"]
        jobs = {v: [] for v in views}
        for seed in seeds:  # seeds outermost: load on a shared machine reaches every K alike
            for v in views:
                jobs[v].append(student_job(out, folder, v, seed, a))
    for v in views:
        results[v] = {"jobs": jobs[v], **summarise(jobs[v])}
    if "none" in results:
        base = results["none"]["train_time_s"]["mean"]
        for v in views:
            results[v]["time_over_none"] = round(results[v]["train_time_s"]["mean"] / base, 3)
    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                    platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": settings(a),
        "teacher": {"train_s": teacher_s, "best_val_acc": teacher_acc},
        "views": results,
    }  # fmt: skip
    emit(report, a.out)


if __name__ == "__main__":
    main()
