r"""Where a training step's time goes: data, teacher, student, loss terms, backward, optimizer.

    make bench-profile     # the harness job, its mixed twin and pretrain, on CIFAR-10 JPEGs
    .venv/bin/python bench/step_profile.py --data data/cifar10_jpeg --classes 2 --per-class 64 \
        --epochs 1 --jobs distill,mixed --out /tmp/p.json              # a smoke run

Each job runs in this process as ``distill-cli`` would run it, under ``torch.profiler`` with
the labels the fit loop and the distill step put on their parts (``record_function``: free
when no profiler runs):

- ``data``: building the next batch (gather, crop, flip, normalise: the loader);
- ``forward``: the loss function, holding ``mixing``, ``teacher``, ``student`` and ``terms``
  in a distill step (the student's forward and the cross-entropy in pretrain);
- ``backward``, ``optimizer``, ``bookkeeping`` (the epoch's running sums);
- ``other``: the rest of the step's wall time (progress display, schedule, Python).

The jobs (one teacher, ``resnet8x4`` pretrained ``--teacher-epochs`` on the images):

- ``distill``: the harness job of issue #24, ``resnet8x4`` -> ``cnn``, Hinton KD at T=4,
  batch 128, the teacher run on every batch (``stage.teacher_cache=false``, default
  preparation and precision: ``auto``, a bfloat16 teacher on a CPU with native bfloat16);
- ``float32``: the same job with the float32 teacher (``stage.teacher_precision=float32``);
- ``mixed``: the same job with function matching's step: ``stage.mix=mixup`` (Beta(1, 1)),
  KL to the teacher alone (``kd.ce_weight=0 kd.kd_weight=1``);
- ``pretrain``: ``pretrain model=cnn`` on the same images, batch 128.

Milliseconds per step are the profiler's CPU time per label over all steps of the job's last
``--epochs - 1`` epochs (all of them when ``--epochs`` is 1), divided by the steps. The wall
time per step and images/s come from the same epochs of ``metrics.jsonl``; the profiler adds
a little to them (its own line in the report: ``profiled_images_per_sec`` against
``images_per_sec`` of an unprofiled run of the same job, run first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from common import emit, run, settings, subset
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

from distill_cli.config import conf_dir
from distill_cli.stages import run_stage

LABELS = ("data", "forward", "mixing", "teacher", "student", "terms", "backward", "optimizer",
          "bookkeeping")  # fmt: skip
TOP = ("data", "forward", "backward", "optimizer", "bookkeeping")  # not nested in one another
KD = ["model=cnn", "stage.teacher_cache=false", "kd.temperature=4"]
JOBS = {  # name: (stage, overrides)
    "distill": ("distill", KD),  # the default teacher precision (auto: bfloat16 on some CPUs)
    "float32": ("distill", [*KD, "stage.teacher_precision=float32"]),
    "mixed": ("distill", [*KD, "stage.mix=mixup", "stage.mix_alpha=1.0", "kd.ce_weight=0",
                          "kd.kd_weight=1"]),
    "pretrain": ("pretrain", ["model=cnn"]),
}  # fmt: skip


def compose_job(out: Path, overrides: list[str]):
    """The job's config, composed as the CLI composes it."""
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose("config", overrides=[f"out_dir={out}", *overrides])


def rows(folder: Path) -> list[dict]:
    """The job's metrics rows, one per epoch."""
    return [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]


def profiled(out: Path, tag: str, overrides: list[str], skip: int) -> dict:
    """Runs the job under the profiler; milliseconds per step by label, and the wall per step."""
    cfg = compose_job(out, [f"tag={tag}", *overrides])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_stage(cfg)
    epochs = rows(out / "b" / tag)
    kept = epochs[skip:] or epochs
    steps_per_epoch = -(-kept[0]["images"] // cfg.stage.batch_size)
    steps = steps_per_epoch * len(epochs)  # the labels count every epoch's steps
    totals = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages() if e.key in LABELS}
    ms = {k: round(totals.get(k, 0.0) / steps, 2) for k in LABELS if k in totals}
    wall = 1000 * statistics.median(e["epoch_time_s"] for e in kept) / steps_per_epoch
    ms["other"] = round(max(wall - sum(ms.get(k, 0.0) for k in TOP), 0.0), 2)
    return {
        "steps": steps, "wall_ms_per_step": round(wall, 2), "ms_per_step": ms,
        "share": {k: round(v / wall, 3) for k, v in ms.items()},
        "profiled_images_per_sec": statistics.median(e["images_per_sec"] for e in kept),
    }  # fmt: skip


def main() -> None:
    """Run the jobs, profiled and not, and write one JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/cifar10_jpeg"))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--jobs", default="distill,float32,mixed,pretrain")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "outputs"
        subset(a.data, root, a.classes, a.per_class)
        data = ["run=b", "dataset=imagefolder", f"dataset.root={root}", "dataset.val_fraction=0",
                "dataset.crop_padding=4", "dataset.flip=true", "device=cpu",
                f"stage.batch_size={a.batch}", "optimizer.clip_grad_norm=null"]  # fmt: skip
        run(out, "pretrain", *data, "tag=teacher", "model=resnet8x4",
            f"stage.epochs={a.teacher_epochs}")  # fmt: skip
        source = f"stage.from={out / 'b' / 'teacher'}"
        skip = 1 if a.epochs > 1 else 0
        for job in a.jobs.split(","):
            stage, extra = JOBS[job]
            overrides = [*data, *extra, f"stage.epochs={a.epochs}"]
            overrides += [source] if stage == "distill" else []
            run(out, stage, *overrides, f"tag={job}_plain")  # unprofiled, first
            plain = rows(out / "b" / f"{job}_plain")[skip:]
            report[job] = profiled(out, job, [f"stage={stage}", *overrides], skip)
            report[job]["images_per_sec"] = statistics.median(e["images_per_sec"] for e in plain)
    if "distill" in report and "mixed" in report:
        report["mixed_over_distill_step"] = round(
            report["mixed"]["wall_ms_per_step"] / report["distill"]["wall_ms_per_step"], 3
        )
    emit({
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                    platform.machine(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": settings(a) | {"data": str(a.data), "images": a.classes * a.per_class},
        **report,
    }, a.out)  # fmt: skip


if __name__ == "__main__":
    main()
