"""Training throughput of ``distill-cli pretrain`` against the usual PyTorch recipe, start-up time.

    make bench                                     # 10,000 CIFAR-shaped images, cnn and resnet8x4
    .venv/bin/python bench/throughput.py --images 512 --epochs 1 --models cnn   # a smoke run
    .venv/bin/python bench/throughput.py --models cnn --streamed   # also dataset.stream=true
    .venv/bin/python bench/throughput.py --compile   # also device.compile=true

The reference is the seed's recipe: torchvision ``ImageFolder`` + ``DataLoader`` with PIL
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` and SGD, on
the same images, model and batch size. Both sides report images/s over whole training epochs
(median over epochs); distill-cli's number is the ``images_per_sec`` of its ``metrics.jsonl``.
The compiled run's first epoch, which includes compilation, is left out of its median.

The ceiling: the bare training step (forward, backward, SGD) of the same model on one batch
already in memory, in distill-cli's layout (channels-last, fp32), without any data path. No
data path can make training faster than this step.

Each side runs in a process of its own, so each reports its own peak resident memory: the
reference's main process (VmHWM, read by itself at the end), the largest process of its tree
(main or a DataLoader worker), and distill-cli's (ru_maxrss of the reaped process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import emit, settings

from distill_cli.data import channel_stats, convert
from distill_cli.data.glyphs import make_glyphs
from distill_cli.models import build_model

CLI = str(Path(sys.executable).parent / "distill-cli")


def write_images(root: Path, n: int) -> None:
    """``n`` CIFAR-shaped (32x32 RGB) PNGs in ``root/train/<class>/``: glyphs scaled up."""
    from PIL import Image

    x, y, names = make_glyphs("source", True, n=n)
    x = convert(x, 32, 3).permute(0, 2, 3, 1).numpy()
    for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
        folder = root / "train" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def reference(root: Path, model_name: str, epochs: int, batch: int, workers: int) -> list[float]:
    """Images/s per epoch of the plain PyTorch recipe."""
    from torchvision import datasets, transforms

    probe = datasets.ImageFolder(root / "train")
    x = torch.stack([transforms.functional.pil_to_tensor(probe[i][0]) for i in range(256)])
    mean, std = channel_stats(x)
    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(mean, std),
    ])  # fmt: skip
    data = datasets.ImageFolder(root / "train", transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(model_name, len(data.classes), 3, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)  # fmt: skip
    rates = []
    for _ in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(labels)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def measured(cmd: list[str]) -> tuple[str, float]:
    """Runs ``cmd``; returns its stdout and its peak resident memory in MiB.

    The peak is ru_maxrss of this child alone (``os.wait4``): the largest resident size of the
    child or of any process it reaped, never of the benchmark or of an earlier child.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, out.read(), err.read())
        return out.read().decode(), usage.ru_maxrss / 1024  # KiB on Linux


def own_peak_mib() -> float:
    """This process's peak resident memory (VmHWM), without its children."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reference_run(root: Path, model_name: str, epochs: int, batch: int, workers: int) -> dict:
    """The reference in a process of its own: images/s per epoch and peak memory."""
    cmd = [sys.executable, __file__, "--reference-only", str(root), "--models", model_name,
           "--epochs", str(epochs), "--batch", str(batch), "--workers", str(workers)]  # fmt: skip
    stdout, tree_peak = measured(cmd)
    return json.loads(stdout) | {"tree_peak_rss_mib": tree_peak}


def distill_cli(root: Path, out: Path, model_name: str, epochs: int, batch: int,
                variant: str = "", extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Images/s per epoch of ``distill-cli pretrain`` on the same images, and its peak memory."""
    tag = f"bench_{model_name}{variant}"
    cmd = [CLI, "pretrain", f"out_dir={out}", "run=bench", f"tag={tag}", "overwrite=true",
           "dataset=imagefolder", f"dataset.root={root}", "dataset.val_fraction=0",
           "dataset.crop_padding=4", "dataset.flip=true", f"model={model_name}",
           f"stage.epochs={epochs}", f"stage.batch_size={batch}", "device=cpu",
           "optimizer.clip_grad_norm=null", *extra]  # the reference loop clips nothing  # fmt: skip
    _, peak = measured(cmd)
    rows = (out / "bench" / tag / "metrics.jsonl").read_text().splitlines()
    return {"rates": [json.loads(r)["images_per_sec"] for r in rows], "peak_rss_mib": peak}


def bare_step(model_name: str, batch: int, rounds: int = 5, steps: int = 3) -> list[float]:
    """Images/s of the training step alone on one in-memory batch, per round of ``steps``."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, 3, 32).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)  # fmt: skip
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # untimed: oneDNN picks its kernels
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates


def startup(runs: int = 5) -> float:
    """Median wall time of ``distill-cli --help`` in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([CLI, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print one JSON document (also written with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="cnn_padded,resnet8x4")
    parser.add_argument("--streamed", action="store_true", help="also stream the files")
    parser.add_argument("--compile", action="store_true", help="also device.compile=true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reference-only", type=Path, help=argparse.SUPPRESS)  # a child run
    args = parser.parse_args()
    if args.reference_only:
        rates = reference(args.reference_only, args.models, args.epochs, args.batch, args.workers)
        print(json.dumps({"rates": rates, "peak_rss_mib": own_peak_mib()}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "outputs"
        write_images(root, args.images)
        results = {}
        for name in args.models.split(","):
            ref = reference_run(root, name, args.epochs, args.batch, args.workers)
            ours = distill_cli(root, out, name, args.epochs, args.batch)
            ceiling = bare_step(name, args.batch)
            ref_rate, our_rate = statistics.median(ref["rates"]), statistics.median(ours["rates"])
            results[name] = {
                "reference_images_per_sec": round(ref_rate, 1),
                "distill_cli_images_per_sec": round(our_rate, 1),
                "speedup": round(our_rate / ref_rate, 2),
                "bare_step_images_per_sec": round(statistics.median(ceiling), 1),
                "bare_step_over_reference": round(statistics.median(ceiling) / ref_rate, 2),
                "bare_step_rounds": [round(r, 1) for r in ceiling],
                "reference_epochs": [round(r, 1) for r in ref["rates"]],
                "distill_cli_epochs": [round(r, 1) for r in ours["rates"]],
                "peak_rss_mib": {
                    "reference_main_process": round(ref["peak_rss_mib"]),
                    "reference_largest_process": round(ref["tree_peak_rss_mib"]),
                    "distill_cli": round(ours["peak_rss_mib"]),
                },
            }
            if args.streamed:
                extra = ("dataset.stream=true", f"dataset.workers={args.workers}")
                streamed = distill_cli(root, out, name, args.epochs, args.batch, "_streamed", extra)
                results[name]["streamed"] = {
                    "images_per_sec": round(statistics.median(streamed["rates"]), 1),
                    "epochs": [round(r, 1) for r in streamed["rates"]],
                    "peak_rss_mib": round(streamed["peak_rss_mib"]),
                }
            if args.compile:
                compiled = distill_cli(root, out, name, args.epochs + 1, args.batch, "_compiled",
                                       ("device.compile=true",))  # fmt: skip
                rate = statistics.median(compiled["rates"][1:])
                results[name]["compiled"] = {
                    "images_per_sec": round(rate, 1),
                    "speedup": round(rate / ref_rate, 2),
                    "epochs": [round(r, 1) for r in compiled["rates"]],
                    "peak_rss_mib": round(compiled["peak_rss_mib"]),
                }
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "settings": settings(args),
        "throughput": results,
        "startup_help_s": round(startup(), 3),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
