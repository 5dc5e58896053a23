"""Training speed on the CPU by number format, memory layout and thread count; bf16 accuracy.

    make bench                                   # also writes docs/bench_cpu_formats.json
    .venv/bin/python bench/cpu_formats.py --out docs/bench_cpu_formats.json
    .venv/bin/python bench/cpu_formats.py --models cnn --batch 8 --rounds 1 --steps 1 \
        --acc-dataset glyphs_target --acc-fraction 0.05 --acc-epochs 1 --acc-seeds 0 \
        --acc-settings bf16_channels_last                              # a smoke run

Throughput: each setting (fp32 or bf16 autocast, contiguous or channels-last, 1 or 2 threads)
trains its own copy of the model on one random 32x32 RGB batch with SGD (Nesterov momentum).
Settings are timed round-robin, one timing of each per round, so that load from other processes
spreads over all of them; the figure is images/s, the median over rounds.

Accuracy: ``distill-cli pretrain`` on the glyph source domain with fp32 contiguous, fp32
channels-last and bf16 channels-last (``device.amp``, ``device.channels_last``), the best
validation accuracy of each, per model and seed.
"""

from __future__ import annotations

import argparse
import contextlib
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

from distill_cli.models import build_model

CLI = str(Path(sys.executable).parent / "distill-cli")
ACCURACY_SETTINGS = {  # name -> device overrides
    "fp32": ["device.amp=false", "device.channels_last=false"],
    "fp32_channels_last": ["device.amp=false", "device.channels_last=true"],
    "bf16_channels_last": ["device.amp=true", "device.channels_last=true"],
}


def cpu_model() -> dict:
    """The processor's name and whether it has the bf16 units that autocast can use."""
    info = {"model_name": platform.processor() or platform.machine(), "flags": []}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["model_name"] = value.strip()
            elif key.strip() == "flags":
                wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
                info["flags"] = [f for f in wanted if f in value.split()]
                break
    return info


class Setting:
    """One model copy trained in one number format, layout and thread count."""

    def __init__(self, model_name: str, bf16: bool, channels_last: bool, threads: int,
                 batch: int) -> None:  # fmt: skip
        layout_name = "channels_last" if channels_last else "contiguous"
        self.name = f"{'bf16' if bf16 else 'fp32'}/{layout_name}/{threads}t"
        self.bf16, self.threads = bf16, threads
        layout = torch.channels_last if channels_last else torch.contiguous_format
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.model = build_model(model_name, 10, 3, 32).to(memory_format=layout).train()
        self.x = torch.randn(batch, 3, 32, 32, generator=gen).contiguous(memory_format=layout)
        self.y = torch.randint(0, 10, (batch,), generator=gen)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step(self) -> None:
        """One training step, as distill-cli's fit loop takes it."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def images_per_sec(self, steps: int) -> float:
        """Times ``steps`` steps after one untimed step at this setting's thread count."""
        torch.set_num_threads(self.threads)
        self.step()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * len(self.y) / (time.perf_counter() - start)


def throughput(model_name: str, batch: int, threads: list[int], rounds: int,
               steps: int) -> dict:  # fmt: skip
    """Images/s of every setting: the median over rounds, and each round's figure."""
    settings = [Setting(model_name, bf16, cl, t, batch)
                for t in threads for bf16 in (False, True) for cl in (False, True)]  # fmt: skip
    rates: dict[str, list[float]] = {s.name: [] for s in settings}
    for _ in range(rounds):
        for s in settings:
            rates[s.name].append(s.images_per_sec(steps))
    base = statistics.median(rates[settings[0].name])
    return {
        name: {"images_per_sec": round(statistics.median(r), 1),
               "vs_fp32_contiguous": round(statistics.median(r) / base, 2),
               "rounds": [round(v, 1) for v in r]}
        for name, r in rates.items()
    }  # fmt: skip


def accuracy(model_name: str, seed: int, setting: str, args: argparse.Namespace,
             out: Path) -> dict:  # fmt: skip
    """Best and last validation accuracy of a glyph pretrain, and its images/s."""
    tag = f"{model_name}_{setting}_s{seed}"
    cmd = [CLI, "pretrain", f"out_dir={out}", "run=acc", f"tag={tag}", "overwrite=true",
           f"dataset={args.acc_dataset}", f"dataset.fraction={args.acc_fraction}",
           f"model={model_name}", f"stage.epochs={args.acc_epochs}", f"seed={seed}", "device=cpu",
           *ACCURACY_SETTINGS[setting]]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    summary = json.loads((out / "acc" / tag / "metrics.json").read_text())
    return {k: summary.get(k) for k in ("best_val_acc", "last_val_acc", "images_per_sec")}


def main() -> None:
    """Run the measurements and print one JSON document (also written with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn_padded,resnet8x4")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="thread counts to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    parser.add_argument("--acc-models", default=None, help="default: --models")
    parser.add_argument("--acc-epochs", type=int, default=4, help="0 skips the accuracy check")
    parser.add_argument("--acc-dataset", default="glyphs_source")
    parser.add_argument("--acc-fraction", type=float, default=1.0)
    parser.add_argument("--acc-settings", default=",".join(ACCURACY_SETTINGS))
    parser.add_argument("--acc-seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")]
    speed = {m: throughput(m, args.batch, threads, args.rounds, args.steps)
             for m in args.models.split(",")}  # fmt: skip
    torch.set_num_threads(default_threads)
    acc: dict = {}
    if args.acc_epochs > 0:
        with tempfile.TemporaryDirectory() as tmp:
            for m in (args.acc_models or args.models).split(","):
                acc[m] = {s: {seed: accuracy(m, int(seed), s, args, Path(tmp))
                              for seed in args.acc_seeds.split(",")}
                          for s in args.acc_settings.split(",")}  # fmt: skip
    report = {
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "default_threads": default_threads,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "settings": settings(args),
        "throughput": speed,
        "accuracy": acc,
    }  # fmt: skip
    emit(report, args.out)


if __name__ == "__main__":
    main()
