r"""Distillation throughput: the usual PyTorch Hinton-KD loop against ``distill-cli distill``.

    make bench-kd        # resnet8x4 -> cnn, 5,000 CIFAR-10 training images (5 classes x 1,000)
    .venv/bin/python bench/kd_loop.py --data data/cifar10_jpeg --classes 2 --per-class 64 \
        --epochs 1 --teacher-epochs 1 --rounds 1 --workers 0        # a smoke run

The reference is the loop most KD code bases write: torchvision ``ImageFolder`` with PIL
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, a
``DataLoader`` with ``--workers`` processes, the teacher in eval mode under ``torch.no_grad`` on
every step, Hinton KD at T=4 (``0.1 * CE + 0.9 * T^2 * KL``, ``batchmean``) and SGD, on the same
images, teacher checkpoint, student (``cnn``, the seed's CNN) and batch size (128). Against it:

- ``distill`` **uncached** (``stage.teacher_cache=false``: the teacher runs on every batch) with
  the plain float32 teacher (``plain``: ``stage.teacher_prep=none``) and prepared (``prepared``:
  the defaults, ``auto`` preparation and precision: folded, and in bfloat16 on a CPU with native
  bfloat16); ``--variants`` adds ``float32`` (the default preparation, the exact float32
  teacher), ``bf16`` (``stage.teacher_precision=bfloat16``), ``mixed`` (function matching's
  step) and ``compile`` (``stage.teacher_prep=compile`` in float32, its first epoch left out);
- ``distill`` **cached**: a second job of the same run, another seed and temperature, that
  reads every teacher output the first (uncached-cost) job stored;
- ``distill`` **uncached, long** (``--long-epochs``): the default preparation (``auto``) on a job
  long enough for it to compile the teacher, its images/s over the whole job (the compile and
  the first epoch included) and its decision from the manifest.

Images/s are the median over epochs (``images_per_sec`` of ``metrics.jsonl``). In-process, on
one batch of the same images: the teacher's forward time plain (eval mode, channels-last, no_grad:
today's distill) and prepared, the student's KD step time (forward, backward, SGD; teacher
outputs given), the teacher's share of the step, teacher / (teacher + student step), and the
prepared teacher's speed-up. Every timing is a median over ``--rounds`` rounds, the variants
interleaved so that load on a shared machine spreads over all of them.
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
import torch.nn.functional as F
from common import emit, run, settings, subset

from distill_cli import checkpoint as ck
from distill_cli.kd.losses import distill_loss
from distill_cli.kd.teacher_prep import PreparedTeacher
from distill_cli.models import build_model

DISTILL = {  # distill-cli variants: the overrides of each, the epochs left out of the median
    "plain": (
        ["stage.teacher_cache=false", "stage.teacher_prep=none", "stage.teacher_precision=float32"],
        0,
    ),  # fmt: skip
    # the default: auto preparation (folds a short job) and auto precision (bfloat16 on a CPU
    # with native bfloat16, else float32)
    "prepared": (["stage.teacher_cache=false"], 0),
    "float32": (["stage.teacher_cache=false", "stage.teacher_precision=float32"], 0),
    "bf16": (["stage.teacher_cache=false", "stage.teacher_precision=bfloat16"], 0),
    # function matching's step (#20): mixup, the teacher live on the mixed batch, KL alone
    "mixed": (
        ["stage.teacher_cache=false", "stage.mix=mixup", "kd.ce_weight=0", "kd.kd_weight=1"],
        0,
    ),  # fmt: skip
    "compile": (
        [
            "stage.teacher_cache=false",
            "stage.teacher_prep=compile",
            "stage.teacher_precision=float32",
        ],
        1,
    ),  # fmt: skip
    "compile_bf16": (
        [
            "stage.teacher_cache=false",
            "stage.teacher_prep=compile",
            "stage.teacher_precision=bfloat16",
        ],
        1,
    ),  # fmt: skip
}
TEACHER = {  # in-process teacher variants: PreparedTeacher's (prep, precision)
    "plain": ("none", None),
    "prepared": ("fold", None),  # float32 here: the in-process timing has no auto precision
    "float32": ("fold", "float32"),
    "bf16": ("fold", "bfloat16"),
    "compile": ("compile", None),
    "compile_bf16": ("compile", "bfloat16"),
}


def reference(root: Path, teacher_path: Path, epochs: int, batch: int, workers: int) -> list[float]:
    """Images/s per epoch of the usual Hinton-KD loop."""
    from torchvision import datasets, transforms

    ckpt = ck.load_checkpoint(teacher_path)
    teacher = ck.model_from_checkpoint(ckpt, teacher_path).eval()
    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(ckpt["mean"], ckpt["std"]),
    ])  # fmt: skip
    data = datasets.ImageFolder(root / "train", transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers)  # fmt: skip
    torch.manual_seed(0)
    student = build_model("cnn", len(data.classes), 3, 32)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)  # fmt: skip
    t = 4.0
    rates = []
    for _ in range(epochs):
        student.train()
        start, seen = time.perf_counter(), 0
        for images, labels in loader:
            with torch.no_grad():
                soft = teacher(images)
            logits = student(images)
            kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(soft / t, 1),
                          reduction="batchmean")  # fmt: skip
            loss = 0.1 * F.cross_entropy(logits, labels) + 0.9 * t * t * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def torchdistill_rates(root: Path, teacher_path: Path, epochs: int, batch: int,
                      workers: int) -> list[float]:  # fmt: skip
    """Images/s per epoch of torchdistill's ``DistillationBox`` on the reference's job.

    The same data, transforms, models, SGD and Hinton KD (``KDLoss``, T=4, 0.1 CE + 0.9 KL) as
    :func:`reference`, configured as torchdistill's sample configs do, trained by the loop of
    its ``examples/torchvision/image_classification.py`` (``pip install torchdistill``).
    """
    from torchdistill.core.distillation import get_distillation_box
    from torchvision import datasets, transforms

    ckpt = ck.load_checkpoint(teacher_path)
    teacher = ck.model_from_checkpoint(ckpt, teacher_path)
    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(ckpt["mean"], ckpt["std"]),
    ])  # fmt: skip
    data = datasets.ImageFolder(root / "train", transform=tf)
    torch.manual_seed(0)
    student = build_model("cnn", len(data.classes), 3, 32)
    kd = {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
          "teacher_module_io": "output", "temperature": 4.0, "alpha": 0.1,
          "reduction": "batchmean"}  # fmt: skip
    config = {
        "num_epochs": epochs,
        "train_data_loader": {
            "dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler},
            "kwargs": {"batch_size": batch, "num_workers": workers, "drop_last": True},
        },
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                               "weight_decay": 5e-4}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
    }  # fmt: skip
    box = get_distillation_box(teacher, student, {"train": data}, config, torch.device("cpu"),
                               None, False, 1)  # fmt: skip
    rates = []
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        start, seen = time.perf_counter(), 0
        for images, labels, supp in box.train_data_loader:
            loss = box.forward_process(images, labels, supp)
            box.post_forward_process(loss=loss)
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - start))
        box.post_epoch_process()
    return rates


def distill_rates(out: Path, tag: str, args: list[str], skip: int = 0) -> list[float]:
    """Images/s per epoch of one ``distill-cli distill`` job (the first ``skip`` left out)."""
    run(out, "distill", "run=b", f"tag={tag}", *args)
    rows = (out / "b" / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["images_per_sec"] for r in rows][skip:]


def one_batch(root: Path, mean: list[float], std: list[float], batch: int) -> torch.Tensor:
    """``batch`` of the images, normalised, channels-last: what a distill step feeds the teacher."""
    from torchvision.io import read_image

    files = sorted(f for f in (root / "train").rglob("*") if f.is_file())[:batch]
    x = torch.stack([read_image(str(f)) for f in files]).float() / 255
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last)


def median_time(fn, rounds: list[list[float]], reps: int) -> None:
    """Appends the median seconds of ``reps`` calls of ``fn`` to ``rounds``."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    rounds.append(statistics.median(times))


def teacher_share(teacher_path: Path, root: Path, batch: int, variants: list[str], rounds: int,
                  reps: int) -> dict:  # fmt: skip
    """The teacher's forward time per variant, the student's step, the share and speed-ups."""
    ckpt = ck.load_checkpoint(teacher_path)
    teacher = ck.model_from_checkpoint(ckpt, teacher_path).eval().requires_grad_(False)
    teacher.to(memory_format=torch.channels_last)  # as the distill stage does today
    x = one_batch(root, ckpt["mean"], ckpt["std"], batch)
    y = torch.randint(0, teacher.num_classes, (len(x),))
    runners, first_s = {}, {}
    for name in variants:
        start = time.perf_counter()
        runners[name] = PreparedTeacher(teacher, [], *TEACHER[name])
        runners[name](x)  # the check against the plain teacher; compile compiles here
        first_s[name] = round(time.perf_counter() - start, 2)
    torch.manual_seed(0)
    student = build_model("cnn", teacher.num_classes, 3, 32).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)  # fmt: skip
    soft = runners[variants[0]](x)["logits"]

    def student_step() -> None:
        logits = student(x)
        loss = distill_loss(logits, soft, y, "kd", 0.1, 0.9, temperature=4.0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    student_step()  # untimed: oneDNN picks its kernels
    times: dict[str, list[float]] = {name: [] for name in [*variants, "student_step"]}
    for _ in range(rounds):  # round-robin: load on a shared machine reaches every variant
        for name in variants:
            median_time(lambda r=runners[name]: r(x), times[name], reps)
        median_time(student_step, times["student_step"], reps)
    ms = {name: round(1000 * statistics.median(t), 2) for name, t in times.items()}
    step = ms["student_step"]
    return {
        "batch": len(x), "forward_ms": ms, "rounds_ms": {
            k: [round(1000 * s, 2) for s in v] for k, v in times.items()},
        "first_call_s": first_s,
        "prep": {name: r.info for name, r in runners.items()},
        "teacher_share_of_step": {name: round(ms[name] / (ms[name] + step), 3)
                                  for name in variants},
        "forward_speedup_over_plain": {name: round(ms["plain"] / ms[name], 2)
                                       for name in variants if "plain" in ms},
    }  # fmt: skip


def main() -> None:
    """Run the benchmark and write one JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data/cifar10_jpeg"),
                   help="an image folder with train/<class>/ (make cifar10-data)")  # fmt: skip
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--per-class", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=1, help="pretraining of the teacher")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="the reference's DataLoader workers")
    p.add_argument("--variants", default="plain,prepared",
                   help=f"distill-cli and teacher variants, of {','.join(DISTILL)}")  # fmt: skip
    p.add_argument("--rounds", type=int, default=5, help="of the in-process teacher timing")
    p.add_argument("--reps", type=int, default=3, help="forwards per round")
    p.add_argument("--long-epochs", type=int, default=40,
                   help="the default on a long uncached job (0: not run)")  # fmt: skip
    p.add_argument("--parts", default="reference,distill,teacher")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    variants, parts = a.variants.split(","), a.parts.split(",")
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "outputs"
        subset(a.data, root, a.classes, a.per_class)
        data = ["dataset=imagefolder", f"dataset.root={root}", "dataset.val_fraction=0",
                "dataset.crop_padding=4", "dataset.flip=true", "device=cpu",
                f"stage.batch_size={a.batch}", "optimizer.clip_grad_norm=null"]  # fmt: skip
        start = time.perf_counter()
        run(out, "pretrain", "run=b", "tag=teacher", *data, "model=resnet8x4",
            f"stage.epochs={a.teacher_epochs}")  # fmt: skip
        result["teacher_pretrain_s"] = round(time.perf_counter() - start, 1)
        teacher = out / "b" / "teacher" / "best.pt"
        student = ["model=cnn", f"stage.epochs={a.epochs}", f"stage.from={teacher.parent}",
                   f"stage.batch_size={a.batch}", "optimizer.clip_grad_norm=null"]  # fmt: skip
        rates: dict[str, list[float]] = {}
        if "reference" in parts:
            rates["reference"] = reference(root, teacher, a.epochs, a.batch, a.workers)
        if "torchdistill" in parts:
            rates["torchdistill"] = torchdistill_rates(root, teacher, a.epochs, a.batch,
                                                       a.workers)  # fmt: skip
        if "distill" in parts:
            for name in variants:
                args, skip = DISTILL[name]
                epochs = [f"stage.epochs={a.epochs + skip}"] if skip else []
                rates[f"distill_{name}"] = distill_rates(out, name, [*student, *args, *epochs],
                                                         skip)  # fmt: skip
            if a.long_epochs:
                long = [*student, "stage.teacher_cache=false", f"stage.epochs={a.long_epochs}"]
                rates["distill_default_long"] = distill_rates(out, "long", long)
                per_epoch = rates["distill_default_long"]  # the same images every epoch
                result["default_long"] = {
                    "epochs": a.long_epochs,
                    "job_images_per_sec": round(len(per_epoch) / sum(1 / r for r in per_epoch), 1),
                    "teacher_prep": json.loads((out / "b" / "long" / "manifest.json").read_text())[
                        "teacher_prep"],
                }  # fmt: skip
            fill = distill_rates(out, "fill", [*student, "kd.temperature=4"])
            rates["distill_cache_fill"] = fill
            again = [*student, "seed=1", "kd.temperature=2"]  # another job of the sweep
            rates["distill_cached"] = distill_rates(out, "cached", again)
            manifest = json.loads((out / "b" / "cached" / "manifest.json").read_text())
            result["cached_hit_rate"] = manifest["teacher_cache"]["hit_rate"]
        medians = {k: round(statistics.median(v), 1) for k, v in rates.items() if v}
        result["images_per_sec"] = medians
        result["epochs_images_per_sec"] = {k: [round(r, 1) for r in v] for k, v in rates.items()}
        if "torchdistill" in medians:
            result["over_torchdistill"] = {
                k: round(v / medians["torchdistill"], 2)
                for k, v in medians.items()
                if k != "torchdistill"
            }
        if "reference" in medians:
            result["over_reference"] = {
                k: round(v / medians["reference"], 2)
                for k, v in medians.items()
                if k != "reference"
            }
            if "default_long" in result:
                long = result["default_long"]
                long["job_over_reference"] = round(
                    long["job_images_per_sec"] / medians["reference"], 2)  # fmt: skip
        if "teacher" in parts:
            timed = [v for v in variants if v in TEACHER]  # mixed has no in-process form
            result["teacher"] = teacher_share(teacher, root, a.batch, timed, a.rounds, a.reps)
    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or
                    platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": settings(a) | {"data": str(a.data), "images": a.classes * a.per_class},
        **result,
    }  # fmt: skip
    emit(report, a.out)


if __name__ == "__main__":
    main()
