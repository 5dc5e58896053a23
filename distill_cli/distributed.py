"""Several processes training one model (DistributedDataParallel), as torchrun starts them.

    torchrun --standalone --nproc_per_node=4 -m distill_cli pretrain run=demo ...

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init` joins the process group
(NCCL on GPUs, each process on ``cuda:LOCAL_RANK``; Gloo on CPU). Every process builds the same
loaders and trains on its rows of every global batch (:class:`Shard`), so ``stage.batch_size``
and the sample order stay those of one process. The student is replicated with
:func:`replicate`; process 0 alone writes files. In a single process every function here is
a no-op that returns its input.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from distill_cli.data import DataError

_device: torch.device | None = None  # this process's device, once the group is joined


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> None:
    """Join the process group when torchrun started several processes.

    ``device`` is the configured one; on CUDA each process takes ``cuda:LOCAL_RANK``.
    """
    global _device
    if not launched() or dist.is_initialized():
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    _device = device


def shutdown(together: bool = False) -> None:
    """Leave the process group (safe when none was joined).

    Args:
        together: Wait for every process first, as after a stage that ended well. Gloo aborts a
            process that tears down its connections while a peer still uses them.
    """
    global _device
    if dist.is_initialized():
        # A DDP wrapper's reducer holds the group; one left in a reference cycle would be freed
        # after the group is gone (the order that aborted a gloo test's worker at exit).
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()
    _device = None


def device() -> torch.device | None:
    """This process's device under torchrun; None in a single process."""
    return _device


def rank() -> int:
    """This process's number, 0 in a single process."""
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    """How many processes train together, 1 in a single process."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Process 0, the only one that writes files and prints."""
    return rank() == 0


def all_reduce_sum(values: Tensor) -> Tensor:
    """``values`` summed over all processes (float64 on the CPU; the input is left alone)."""
    if world() == 1:
        return values
    total = values.to(_device, torch.float64, copy=True)
    dist.all_reduce(total)
    return total.cpu()


def all_reduce_max(value: float) -> float:
    """The largest ``value`` of all processes."""
    if world() == 1:
        return value
    top = torch.tensor([value], dtype=torch.float64, device=_device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return top.item()


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: a decision all processes share."""
    if world() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item())


def share(obj: object) -> object:
    """Process 0's ``obj``, on every process (picklable objects)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first() -> Iterator[None]:
    """Process 0 runs the block first (e.g. a download); the others run it once it succeeded.

    If it fails there, the others raise a DataError that they do not print: process 0 prints
    its own error.
    """
    if world() == 1:
        yield
    elif is_main():
        try:
            yield
        except BaseException:
            share(False)
            raise
        share(True)
    elif share(None):
        yield
    else:
        raise DataError("process 0 could not load the data")


# --- data ------------------------------------------------------------------------------------


class Shard:
    """This process's rows of every batch of ``loader``: rows ``rank``, ``rank + world``, ...

    Every process draws the same global batches (same seeds, same order, same augmentation) and
    keeps its rows, so the global batch is ``loader``'s. ``last_index`` and ``last_view`` (CRD's
    memory bank and the teacher cache read them) are sliced alike; any other attribute is the
    loader's. Interleaved rows give each process its share of labelled and unlabelled images.

    Args:
        loader: A loader yielding ``(images, labels)`` batches.
        rank: This process's number.
        world: Number of processes.
        training: A training batch too small to give every process a row is an error (every
            process must step together); an evaluation batch just leaves some processes out.
    """

    def __init__(self, loader, rank: int, world: int, training: bool) -> None:
        self.loader, self.rank, self.world, self.training = loader, rank, world, training
        self.last_index = torch.empty(0, dtype=torch.int64)
        self.last_view = torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        rows = slice(self.rank, None, self.world)
        for x, y in self.loader:
            if len(y) < self.world:
                if self.training:
                    raise DataError(
                        f"a training batch of {len(y)} images cannot give each of {self.world} "
                        "processes one; raise stage.batch_size or use fewer processes"
                    )
                if len(y) <= self.rank:
                    continue
            for name in ("last_index", "last_view"):
                value = getattr(self.loader, name, None)
                if value is not None:
                    setattr(self, name, value[rows])
            yield _rows(x, rows), y[rows]


def _rows(x: Tensor, rows: slice) -> Tensor:
    """Every ``world``-th image as a dense tensor, in the memory format of ``x``."""
    dense_nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if dense_nhwc and not x.is_contiguous() else torch.contiguous_format
    return x[rows].contiguous(memory_format=fmt)


def shard(loader, training: bool = True):
    """``loader`` as a :class:`Shard` under torchrun; ``loader`` itself (or None) otherwise."""
    if loader is None or world() == 1:
        return loader
    return Shard(loader, rank(), world(), training)


# --- model -----------------------------------------------------------------------------------


class _Trainee(nn.Module):
    """The student, and the modules trained with it (distillation adapters), for DDP to hold.

    ``forward(x, features=True)`` is ``forward_with_features``: DDP prepares each step's
    gradient reduction in its forward, so the student's feature path goes through it too. The
    adapters run after it, on its features; their gradients are reduced in the same backward
    (every parameter of the replica gets a gradient at every step).
    """

    def __init__(self, model: nn.Module, extra: nn.Module | None) -> None:
        super().__init__()
        self.model, self.extra = model, extra

    def forward(self, x: Tensor, features: bool = False):
        return self.model.forward_with_features(x) if features else self.model(x)


class _Replicated(DistributedDataParallel):
    """DDP over a :class:`_Trainee` that still answers like the student (``head``, features)."""

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's logits and features, gradients averaged across processes."""
        return self(x, features=True)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module.model, name)


def replicate(model: nn.Module, extra: nn.Module | None = None) -> nn.Module:
    """``model`` under DistributedDataParallel with torchrun, else ``model`` itself.

    ``extra`` (the distillation adapters, called outside the student's forward) joins the
    replica so that its gradients are averaged in the same backward pass. Buffers are not
    broadcast at every step: each process keeps its own (CRD's memory bank: the rows of the
    images it saw); :func:`average_buffers` aligns the student's once per epoch. Call it after
    choosing which parameters train: DDP averages only those.
    """
    if world() == 1:
        return model
    ids = [_device.index] if _device is not None and _device.type == "cuda" else None
    return _Replicated(_Trainee(model, extra), device_ids=ids, forward_sync_buffers=False)


def unwrap(runner: nn.Module) -> nn.Module:
    """The plain model inside what :func:`replicate` (and torch.compile) returned."""
    runner = getattr(runner, "_orig_mod", runner)
    return runner.module.model if isinstance(runner, _Replicated) else runner


def average_buffers(runner: nn.Module) -> None:
    """Average the student's float buffers (BatchNorm statistics) across processes.

    Each process's running statistics follow its own rows; their mean, taken before validation
    and checkpoints, makes every replica the model that is evaluated and saved.
    """
    if world() == 1:
        return
    for buffer in unwrap(runner).buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world())
