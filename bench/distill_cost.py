r"""What distillation costs over plain training, with and without the teacher-output cache.

    make bench-distill                       # resnet32x4 -> resnet8x4 on ~1,800 32x32 RGB images
    .venv/bin/python bench/distill_cost.py --fraction 0.02 --epochs 2 --student cnn \
        --teacher resnet8 --sweep 2          # a smoke run

Measures, in one run on one machine:

- **distillation overhead**: the median training-epoch time (``epoch_time_s`` in
  ``metrics.jsonl``, validation excluded) of ``distill`` divided by that of ``pretrain`` of the
  same student on the same data; without the cache (the teacher runs on every batch) and with it
  (``stage.aug_views=K``: epochs after the first K are served from the cache);
- **sweep cost**: the wall time of a temperature sweep (``kd.temperature=1,2,4,8``) sharing one
  teacher, with and without the cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import emit, run


def epoch_times(folder: Path, skip: int = 0) -> list[float]:
    """Training seconds of each epoch after the first ``skip``."""
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_time_s"] for r in rows[skip:]]


def main() -> None:
    """Run the measurements and write them as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--fraction", type=float, default=0.33, help="of glyphs_source's 6,000 images")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--views", type=int, default=2, help="stage.aug_views of the cached run")
    p.add_argument("--sweep", type=int, default=4, help="temperatures in the sweep")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    a = p.parse_args()
    data = ["dataset=glyphs_source", "dataset.image_size=32", f"dataset.fraction={a.fraction}",
            "dataset.val_per_class=2", "dataset.crop_padding=4", "dataset.flip=true",
            "stage.batch_size=64", "device=cpu"]  # fmt: skip
    temps = ",".join(str(2**i) for i in range(a.sweep))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run(out, "pretrain", "run=b", *data, f"model={a.teacher}", "stage.epochs=1", "tag=teacher")
        teacher = f"stage.from={out / 'b' / 'teacher'}"
        student = [*data, f"model={a.student}", f"stage.epochs={a.epochs}"]
        run(out, "pretrain", "run=b", *student, "tag=student")
        run(out, "distill", "run=b", *student, teacher, "stage.teacher_cache=false", "tag=live")
        run(out, "distill", "run=b", *student, teacher, f"stage.aug_views={a.views}", "tag=cached")
        plain = statistics.median(epoch_times(out / "b" / "student"))
        live = statistics.median(epoch_times(out / "b" / "live"))
        warm = epoch_times(out / "b" / "cached", skip=a.views) or [float("nan")]
        cached = statistics.median(warm)
        sweep = [*data, f"model={a.student}", "stage.epochs=1", teacher, f"kd.temperature={temps}"]
        sweep_live = run(out, "distill", "-m", "run=s", *sweep, "stage.teacher_cache=false",
                         "tag=live")  # fmt: skip
        sweep_cached = run(out, "distill", "-m", "run=s", *sweep, "tag=cached")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},  # fmt: skip
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "teacher": a.teacher, "student": a.student, "epochs": a.epochs, "aug_views": a.views,
        "epoch_s": {"pretrain": plain, "distill_live": live, "distill_cached": cached},
        "overhead": {"live": round(live / plain, 3), "cached": round(cached / plain, 3)},
        "sweep": {"jobs": a.sweep, "live_s": round(sweep_live, 1),
                  "cached_s": round(sweep_cached, 1)},  # fmt: skip
    }  # fmt: skip
    emit(result, a.out)


if __name__ == "__main__":
    main()
