"""Training throughput of ``distill-cli pretrain`` against the usual PyTorch recipe, start-up time.

    make bench                                     # 10,000 CIFAR-shaped images, cnn and resnet8x4
    .venv/bin/python bench/throughput.py --images 512 --epochs 1 --models cnn   # a smoke run

The reference is the seed's recipe: torchvision ``ImageFolder`` + ``DataLoader`` with PIL
``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` and SGD, on
the same images, model and batch size. Both sides report images/s over whole training epochs
(median over epochs); distill-cli's number is the ``images_per_sec`` of its ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_cli.data import channel_stats, convert
from distill_cli.glyphs import make_glyphs
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


def distill_cli(root: Path, out: Path, model_name: str, epochs: int, batch: int) -> list[float]:
    """Images/s per epoch of ``distill-cli pretrain`` on the same images."""
    tag = f"bench_{model_name}"
    cmd = [CLI, "pretrain", f"out_dir={out}", "run=bench", f"tag={tag}", "overwrite=true",
           "dataset=imagefolder", f"dataset.root={root}", "dataset.val_fraction=0",
           "dataset.crop_padding=4", "dataset.flip=true", f"model={model_name}",
           f"stage.epochs={epochs}", f"stage.batch_size={batch}", "device=cpu"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = (out / "bench" / tag / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["images_per_sec"] for r in rows]


def startup(runs: int = 5) -> float:
    """Median wall time of ``distill-cli --help`` in seconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([CLI, "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _maxrss(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def main() -> None:
    """Run the benchmark and print one JSON document (also written with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="cnn,resnet8x4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "outputs"
        write_images(root, args.images)
        results = {}
        for name in args.models.split(","):
            ref = reference(root, name, args.epochs, args.batch, args.workers)
            ours = distill_cli(root, out, name, args.epochs, args.batch)
            results[name] = {
                "reference_images_per_sec": round(statistics.median(ref), 1),
                "distill_cli_images_per_sec": round(statistics.median(ours), 1),
                "speedup": round(statistics.median(ours) / statistics.median(ref), 2),
                "reference_epochs": [round(r, 1) for r in ref],
                "distill_cli_epochs": [round(r, 1) for r in ours],
            }
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "throughput": results,
        "startup_help_s": round(startup(), 3),
        "peak_rss_mib": {  # ru_maxrss is in KiB on Linux
            "reference_process": round(_maxrss(resource.RUSAGE_SELF)),
            "distill_cli_runs": round(_maxrss(resource.RUSAGE_CHILDREN)),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
