r"""How close a bfloat16 teacher stays to its float32 self, and how much faster it runs.

    make demo && .venv/bin/python bench/teacher_precision.py outputs/demo/finetune/best.pt
    .venv/bin/python bench/teacher_precision.py RUN/finetune/best.pt --temperature 4 \
        --out docs/bench_teacher_precision.json

``stage.teacher_precision=auto`` (the default) runs a float32 student's teacher in bfloat16 on a
CPU with native bfloat16 dot products. This checks what that changes for a teacher and its test
split: both forms are the folded teacher (``stage.teacher_prep=fold``), one under bfloat16
autocast. It reports what distillation reads: the agreement of their top-1 predictions, the KL
divergence between their softened outputs at ``--temperature`` (mean and largest per image), the
largest change of a softened probability, the largest logit error relative to the largest logit
(what the stage's check bounds), each form's test top-1, and their forward times on one batch
(the fastest of ``--rounds`` calls, the forms interleaved).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import emit, settings

from distill_cli import checkpoint as ck
from distill_cli.data import convert
from distill_cli.data.loaders import BatchLoader, Normalise
from distill_cli.data.subsets import load_dataset
from distill_cli.kd.teacher_prep import PreparedTeacher, native_bf16_cpu

FORMS = ("float32", "bfloat16")  # stage.teacher_precision of each form


def compare(path: Path, batch: int, temperature: float, rounds: int, out_dir: str) -> dict:
    """The bfloat16 teacher against the float32 one on the checkpoint's own test split."""
    ckpt = ck.load_checkpoint(path)
    teacher = ck.model_from_checkpoint(ckpt, path).eval().requires_grad_(False)
    teacher.to(memory_format=torch.channels_last)  # as the distill stage runs it on the CPU
    m = ckpt["model"]
    split = load_dataset(ckpt["dataset"], False, out_dir)
    x = convert(split.x, m["image_size"], m["in_channels"])
    loader = BatchLoader(x, split.y, batch, Normalise(ckpt["mean"], ckpt["std"]),
                         device=torch.device("cpu"))  # fmt: skip
    forms = {name: PreparedTeacher(teacher, [], "fold", name) for name in FORMS}
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in forms}
    labels, first = [], None
    for images, y in loader:
        first = images if first is None else first
        labels.append(y)
        for name, form in forms.items():
            logits[name].append(form(images)["logits"].float())
    f32, b16 = (torch.cat(logits[name]) for name in forms)
    y = torch.cat(labels)
    t = temperature
    p32, p16 = F.softmax(f32 / t, 1), F.softmax(b16 / t, 1)
    kl = (p32 * (F.log_softmax(f32 / t, 1) - F.log_softmax(b16 / t, 1))).sum(1)
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, form in forms.items():
            start = time.perf_counter()
            form(first)
            times[name].append(time.perf_counter() - start)
    best = {name: min(ts) for name, ts in times.items()}
    return {
        "checkpoint": str(path),
        "images": len(y),
        "classes": int(f32.shape[1]),
        "top1_agreement": round((f32.argmax(1) == b16.argmax(1)).float().mean().item(), 5),
        "kl_mean": float(f"{kl.mean().item():.3g}"),
        "kl_max": float(f"{kl.max().item():.3g}"),
        "soft_prob_max_change": float(f"{(p32 - p16).abs().max().item():.3g}"),
        "max_relative_logit_error": float(
            f"{((b16 - f32).abs().max() / f32.abs().max().clamp(min=1)).item():.3g}"
        ),  # fmt: skip
        "test_top1": {
            name: round((lg.argmax(1) == y).float().mean().item() * 100, 2)
            for name, lg in zip(forms, (f32, b16), strict=True)
        },  # fmt: skip
        "forward_ms": {name: round(s * 1000, 1) for name, s in best.items()},
        "speedup": round(best["float32"] / best["bfloat16"], 2),
        "checks": {name: form.info.get("max_error") for name, form in forms.items()},
    }


def main() -> None:
    """Compare each checkpoint's two forms; print and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="teacher best.pt files")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--temperature", type=float, default=4.0, help="of the softened outputs")
    p.add_argument("--rounds", type=int, default=5, help="timed forwards of one batch per form")
    p.add_argument("--out-dir", default="outputs", help="where decoded splits may be cached")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "native_bf16": native_bf16_cpu(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
        "settings": settings(a) | {"checkpoints": [str(c) for c in a.checkpoints]},
        "teachers": [
            compare(c, a.batch, a.temperature, a.rounds, a.out_dir) for c in a.checkpoints
        ],  # fmt: skip
    }
    emit(report, a.out)


if __name__ == "__main__":
    main()
