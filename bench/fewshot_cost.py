r"""What a few-shot stage costs under each validation protocol and checkpoint interval.

    make bench-fewshot                          # CIFAR-10 animals -> vehicles, 10 shots
    .venv/bin/python bench/fewshot_cost.py --data glyphs --epochs 3 --distill-epochs 3 \
        --settings default,val1                 # a smoke run on the built-in data

A teacher (``resnet8x4``) is pretrained briefly on the source classes, only so that there is one
to finetune: its accuracy does not matter here. Then the 10-shot finetune (and a distill of the
finetuned teacher into ``cnn_padded``) runs once per setting, each a fresh ``distill-cli``
process, and the wall time of the whole command is measured with its training time
(``train_time_s``). Each distill runs in a run of its own, so that none reads teacher outputs
another one cached:

- ``default``: the few-shot protocol (validation holds as many images per class as the shots)
  and checkpoints every ``stage.save_every_s`` (60 s);
- ``val1``: one validation image per class, the fastest honest selection;
- ``every_epoch``: the default split, with best.pt and last.pt written after every epoch;
- ``old_default``: the split before the protocol, 10% of each class (500 CIFAR-10 images per
  class), with checkpoints after every epoch.

The figure of merit is wall time under ``default`` divided by wall time under ``val1``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
from common import emit, run, settings

SOURCE = "[bird,cat,deer,dog,frog,horse]"
TARGET = "[airplane,automobile,ship,truck]"
SETTINGS = {
    "default": [],
    "val1": ["dataset.val_per_class=1"],
    "every_epoch": ["stage.save_every_s=0"],
    "old_default": ["dataset.val_per_class=500", "stage.save_every_s=0"],
}


def data_args(data: str, classes: str | None, shots: int | None) -> list[str]:
    """The dataset overrides: CIFAR-10 images in an image folder, or the built-in glyphs."""
    if data == "glyphs":
        name = "glyphs_source" if classes == SOURCE else "glyphs_target"
        return [f"dataset={name}"] + ([f"dataset.shots={shots}"] if shots else [])
    args = ["dataset=imagefolder", f"dataset.root={data}", f"dataset.classes={classes}"]
    return args + ([f"dataset.shots={shots}"] if shots else ["dataset.fraction=0.05"])


def measure(out: Path, run_name: str, tag: str, stage: list[str], extra: list[str]) -> dict:
    """One stage in one setting: wall and training time, images trained on and held out."""
    wall = run(out, *stage, f"run={run_name}", f"tag={tag}", *extra)
    final = json.loads((out / run_name / tag / "metrics.json").read_text())
    return {
        "wall_s": round(wall, 2),
        "train_time_s": final["train_time_s"],
        "n_train": final["n_train"],
        "n_val": final["n_val"],
        "best_val_acc": final["best_val_acc"],
    }


def main() -> None:
    """Run the measurements and write them as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/cifar10_jpeg",
                   help="an extracted cifar10_jpeg folder, or 'glyphs'")  # fmt: skip
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--epochs", type=int, default=20, help="of the finetune")
    p.add_argument("--distill-epochs", type=int, default=200)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    a = p.parse_args()
    chosen = a.settings.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        run(out, "pretrain", "run=bench", "model=resnet8x4", "stage.epochs=1",
            *data_args(a.data, SOURCE, None))  # fmt: skip
        target = [*data_args(a.data, TARGET, a.shots), "stage.batch_size=32"]
        finetune = ["finetune", *target, f"stage.epochs={a.epochs}"]
        results: dict[str, dict] = {"finetune": {}, "distill": {}}
        for name in chosen:
            results["finetune"][name] = measure(
                out, "bench", f"ft_{name}", finetune, SETTINGS[name]
            )
        teacher = f"stage.from={out / 'bench' / f'ft_{chosen[0]}'}"
        distill = [
            "distill",
            *target,
            "model=cnn_padded",
            teacher,
            f"stage.epochs={a.distill_epochs}",
        ]
        for name in chosen:  # a run each: its own teacher cache, filled from cold
            results["distill"][name] = measure(
                out, f"kd_{name}", "distill", distill, SETTINGS[name]
            )
    for stage in results.values():
        if "default" in stage and "val1" in stage:
            stage["default_over_val1"] = round(
                stage["default"]["wall_s"] / stage["val1"]["wall_s"], 3
            )
    emit({"settings": settings(a), "machine": _machine(), **results}, a.out)


def _machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}  # fmt: skip


if __name__ == "__main__":
    main()
