"""What a practitioner decides from: accuracy, calibration, agreement, size, cost and speed.

``distill-cli eval`` collects the test logits of the teacher and the student with
:func:`collect_logits`, scores them with :func:`classification_metrics` and :func:`agreement`,
measures each model with :func:`compression_metrics`, and compares the two with :func:`ratios`
and :func:`kept_accuracy`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

AmpLike = contextlib.AbstractContextManager | Callable[[], contextlib.AbstractContextManager]


def expected_calibration_error(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error in percent (Guo et al. 2017).

    Confidence is the top softmax probability. Samples fall into ``n_bins`` equal-width bins
    ``((m-1)/M, m/M]``; ECE is the bin-size weighted mean of ``|accuracy - mean confidence|``.
    """
    probs = F.softmax(logits.double(), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(confidence, inner_edges)  # right-closed: edge[i-1] < c <= edge[i]
    count = torch.bincount(bins, minlength=n_bins).double()
    gap = torch.bincount(bins, weights=correct - confidence, minlength=n_bins)
    # |sum(correct - confidence)| over a bin = count * |accuracy - mean confidence|
    return 100 * (gap.abs().sum() / count.sum()).item()


def classification_metrics(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Top-1 and top-5 accuracy, NLL and ECE (percent except NLL) over all samples.

    Args:
        logits: (N, C) scores; top-5 becomes top-min(5, C).
        labels: (N,) true class indices.
        n_bins: Confidence bins for the ECE.
    """
    n = len(labels)
    if n == 0:
        return {"top1": math.nan, "top5": math.nan, "nll": math.nan, "ece": math.nan, "n": 0}
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {
        "top1": 100 * (top[:, 0] == labels).double().mean().item(),
        "top5": 100 * (top == labels[:, None]).any(dim=1).double().mean().item(),
        "nll": F.cross_entropy(logits, labels).item(),
        "ece": expected_calibration_error(logits, labels, n_bins),
        "n": n,
    }


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Percent of samples on which the student's and the teacher's top-1 classes agree."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shapes differ: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")  # fmt: skip
    same = student_logits.argmax(dim=1).cpu() == teacher_logits.argmax(dim=1).cpu()
    return 100 * same.double().mean().item() if len(same) else math.nan


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own mode.

    Restoring per submodule keeps a frozen backbone in eval mode inside a training student.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def collect_logits(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], amp: AmpLike | None = None
) -> tuple[Tensor, Tensor]:
    """Run the model over all batches and return (float32 logits, labels), both on the CPU.

    Args:
        model: Maps images to (B, C) logits; already on the batches' device.
        batches: (images, labels) pairs.
        amp: Autocast context (or a factory for one) to run each forward in; None for none.
    """
    all_logits, all_labels = [], []
    with eval_mode(model), torch.no_grad():
        for images, labels in batches:
            with _context(amp):
                logits = model(images)
            all_logits.append(logits.float().cpu())
            all_labels.append(labels.cpu())
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels)


def _context(amp: AmpLike | None) -> contextlib.AbstractContextManager:
    """A context manager from None, a context manager, or a factory of one."""
    if amp is None:
        return contextlib.nullcontext()
    # torch.autocast objects are also callable (as decorators), so test for a context first
    return amp if hasattr(amp, "__enter__") else amp()


def compression_metrics(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    *,
    checkpoint: str | Path | None = None,
    latency_runs: int = 30,
    throughput_batch: int = 256,
    throughput_runs: int = 5,
    warmup: int = 3,
) -> dict[str, float]:
    """Size, compute cost and speed of one model, measured on random inputs.

    ``flops`` is what ``torch.utils.flop_counter.FlopCounterMode`` counts for one forward pass at
    batch 1: matrix multiplications and convolutions only, two FLOPs per multiply-add (bias adds,
    activations, normalisation and pooling are not counted). ``macs`` is ``flops / 2``.

    Args:
        model: The model, already on ``device``; left in the train/eval mode it came in.
        input_shape: (channels, height, width) of one image.
        device: Where the random inputs live and the timing runs.
        checkpoint: The model's file; when given, ``size_mb`` is its size on disk.
        latency_runs: Timed batch-1 forwards for the latency percentiles.
        throughput_batch: Batch size for the throughput measurement.
        throughput_runs: Timed forwards at that batch size; the median is reported.
        warmup: Untimed forwards before each measurement.

    Returns:
        ``params``, ``size_mb`` (MiB; float32 parameters and buffers without a checkpoint),
        ``macs``, ``flops``, ``latency_ms_p50``, ``latency_ms_p95`` and ``throughput`` (images/s).
    """
    device = torch.device(device)
    params = sum(p.numel() for p in model.parameters())
    if checkpoint is not None:
        size_bytes = Path(checkpoint).stat().st_size
    else:
        size_bytes = 4 * (params + sum(b.numel() for b in model.buffers()))
    dtype = next(model.parameters(), torch.empty(0)).dtype
    one = torch.randn(1, *input_shape, device=device, dtype=dtype)
    many = torch.randn(throughput_batch, *input_shape, device=device, dtype=dtype)
    with eval_mode(model), torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(one)
        flops = counter.get_total_flops()
        latencies = _time_forward(model, one, device, latency_runs, warmup)
        batch_times = _time_forward(model, many, device, throughput_runs, warmup)
    return {
        "params": params,
        "size_mb": size_bytes / 2**20,
        "macs": flops / 2,
        "flops": flops,
        "latency_ms_p50": 1000 * _quantile(latencies, 0.5),
        "latency_ms_p95": 1000 * _quantile(latencies, 0.95),
        "throughput": throughput_batch / _quantile(batch_times, 0.5),
    }


def _time_forward(
    model: nn.Module, x: Tensor, device: torch.device, runs: int, warmup: int
) -> list[float]:
    """Seconds per forward pass over ``runs`` timed runs after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for _ in range(warmup):
        model(x)
    sync()
    seconds = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        model(x)
        sync()  # CUDA kernels run asynchronously; wait so the clock sees the real work
        seconds.append(time.perf_counter() - start)
    return seconds


def _quantile(values: list[float], q: float) -> float:
    """Linearly interpolated quantile of a non-empty list."""
    return torch.tensor(values, dtype=torch.float64).quantile(q).item()


def ratios(
    student: dict,
    teacher: dict,
    keys: Iterable[str] = ("params", "size_mb", "macs", "latency_ms_p50", "throughput"),
) -> dict[str, float]:
    """``<key>_ratio`` = student / teacher for each key both hold; NaN where the teacher's is 0."""
    return {
        f"{key}_ratio": student[key] / teacher[key] if teacher[key] else math.nan
        for key in keys
        if student.get(key) is not None and teacher.get(key) is not None
    }


def kept_accuracy(student_top1: float, teacher_top1: float) -> float:
    """Percent of the teacher's top-1 accuracy that the student keeps."""
    return 100 * student_top1 / teacher_top1 if teacher_top1 else math.nan
