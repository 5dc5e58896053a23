"""The frozen teacher, prepared once for fast inference and checked against the plain one.

    distill-cli distill stage.teacher_prep=compile stage.teacher_precision=bfloat16

The teacher never trains, so what training needs (separate BatchNorm passes, autograd records,
an eager graph) can go before the first step:

- ``auto`` (the default): ``fold``, then ``compile`` only where it pays: when the folded
  teacher's forward time on the first batch, times the forwards the job will run (its uncached
  batches), reaches ``compile_after_s`` seconds, unless the compiled forward then measures more
  than :data:`SLOWER` times the folded one's. A job whose teacher outputs are already cached
  keeps the preparation that cached them.
- ``fold``: BatchNorm folded into the convolution before it (``models.fold``), the teacher's
  memory layout kept (channels-last when the stage uses it), forward under
  ``torch.inference_mode``. Exact up to float rounding.
- ``compile``: ``fold``, then ``torch.compile`` of the teacher's forward alone (its first
  batch compiles: seconds to tens of seconds, paid back only by long jobs).
- ``none``: the plain eval-mode teacher under ``torch.no_grad``.

``precision`` runs the teacher's forward in its own number format whatever the student's:
``float32`` (autocast off), ``bfloat16`` or ``float16`` (autocast); None keeps the student's.
``stage.teacher_precision=auto`` (the default) is settled by :func:`resolve_precision`:
``bfloat16`` for a float32 student on a CPU with native bfloat16 dot products, else the student's.

Every preparation is compared once with the plain teacher on a real batch: each output (logits
and the features the method reads) must lie within :data:`TOLERANCE` of the plain one, relative
to the largest plain value (at least 1). Otherwise, or if the preparation fails, the plain
teacher takes over and one warning line says why.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill_cli.models.fold import fold_batchnorm
from distill_cli.models.interface import DistillModel

log = logging.getLogger("distill_cli")

PREPS = ("none", "fold", "compile", "auto")
PRECISIONS = ("float32", "bfloat16", "float16")
# Largest allowed |prepared - plain| over max(1, max |plain|), by the outputs' precision:
# folding only reorders float32 rounding (measured below 2e-6 on every model of the zoo); a
# half-precision forward keeps 8 (bfloat16) or 11 (float16) bits of each value.
TOLERANCE = {"float32": 1e-3, "half": 5e-2}
# ``auto`` compiles once the job's estimated teacher time reaches this: compiling the teacher took
# 14 s cold (1.7 to 7 s with inductor's caches warm) on 2 CPU cores, and saved 24% to 45% of its
# forward (1.31x to 1.83x in six runs, docs/performance.md), so 120 s of teacher time pays the
# compile back about twice over at the smallest measured saving.
COMPILE_AFTER_S = 120.0
# ``auto`` drops a compiled teacher whose forward, on the first batch, takes longer than this
# times the folded one's (the fastest of 3 calls each)
SLOWER = 1.1


# CPU flags of native bfloat16 dot products (x86). With AVX-512 BF16 and no AMX a bfloat16 teacher
# forward measured 2.3x to 3.7x a float32 one; with AMX tiles too, 4.2x to 4.6x, and an uncached
# distill job 2.9x to 3.2x (docs/performance.md). Without them bfloat16 has no native
# multiply-add and was not measured to pay.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The CPU flag that gives this processor native bfloat16 dot products, or None.

    Read from ``cpuinfo``'s first ``flags`` line (Linux on x86); elsewhere (macOS, Windows,
    ARM, whose bfloat16 speed has not been measured here) None.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def resolve_precision(
    precision: str | None, device_type: str, student_amp: bool, native_bf16: str | None
) -> tuple[str | None, str | None]:
    """``stage.teacher_precision``, with ``auto`` settled for this device and student.

    ``auto`` runs the teacher in ``bfloat16`` where that pays and the student trains in float32:
    on a CPU whose ``native_bf16`` flag (:func:`native_bf16_cpu`) gives bfloat16 dot
    products. Everywhere else it keeps the student's format: on CUDA the student's autocast
    already is bfloat16, and without the flag bfloat16 was not measured to pay.

    Returns:
        The precision for :class:`PreparedTeacher`, and for ``auto`` why (else None).
    """
    if precision != "auto":
        return precision, None
    if device_type != "cpu":
        return None, f"as the student: auto picks a format on the CPU only, not on {device_type}"
    if student_amp:
        return None, "as the student: it trains under bfloat16 autocast already"
    if native_bf16 is None:
        return None, "as the student (float32): no native bfloat16 on this CPU"
    return "bfloat16", f"bfloat16: native bfloat16 dot products on this CPU ({native_bf16})"


def resolve(prep: str | None, compile: bool) -> str:
    """``stage.teacher_prep``: null means ``auto``, or ``compile`` when ``device.compile`` is on."""
    if prep is None:
        return "compile" if compile else "auto"
    if prep not in PREPS:
        raise ValueError(f"unknown teacher preparation {prep!r}; valid: {', '.join(PREPS)}")
    return prep


class PreparedTeacher:
    """The teacher's outputs by name (``logits`` and ``names``), from its prepared form.

    Args:
        teacher: The frozen teacher in eval mode (its memory format is kept).
        names: The features the distillation method reads (``forward_with_features`` keys).
        prep: One of :data:`PREPS`; ``auto`` settles on ``fold`` or ``compile`` at the check.
        precision: One of :data:`PRECISIONS`, or None for the surrounding autocast (the
            student's).
        forwards: ``auto`` only: the teacher forwards the job expects to run (its uncached
            batches).
        compile_after_s: ``auto`` only: the estimated teacher seconds from which it compiles.
        precision_auto: Why ``stage.teacher_precision=auto`` chose ``precision``
            (:func:`resolve_precision`); None when the precision was asked for.
    """

    def __init__(
        self,
        teacher: DistillModel,
        names: Sequence[str] = (),
        prep: str = "fold",
        precision: str | None = None,
        forwards: int = 0,
        compile_after_s: float = COMPILE_AFTER_S,
        precision_auto: str | None = None,
    ) -> None:
        if prep not in PREPS or precision not in (None, *PRECISIONS):
            raise ValueError(f"teacher preparation {prep!r}, precision {precision!r}: unknown")
        self.plain, self.names = teacher, tuple(names)
        self.asked, self.precision = prep, precision
        self.prep = "fold" if prep == "auto" else prep  # auto starts folded, may compile later
        self.forwards, self.compile_after_s = forwards, compile_after_s
        self.cached: str | None = None  # auto: the preparation whose outputs the cache holds
        self.precision_auto = precision_auto
        self.info: dict = {"prep": self.prep, "precision": precision}
        if precision_auto is not None:
            self.info["precision_auto"] = precision_auto
        self.checked: bool | None = None  # None: not compared with the plain teacher yet
        self._run: Callable[[Tensor], dict[str, Tensor]] = self._plain
        if prep == "none" and precision is None:
            self.checked = True  # the plain teacher itself: nothing to check
            return
        try:
            self._run = self._build()
        except Exception as exc:  # a preparation that cannot be built: the plain teacher runs
            self._fall_back(_why(exc))

    def _build(self) -> Callable[[Tensor], dict[str, Tensor]]:
        model = self.plain
        if self.prep != "none":
            model, report = _fold(model)
            self.info.update(folded=report.folded, left=report.left, untraced=report.untraced)
            channels_last = _is_channels_last(self.plain)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            self.info.update(channels_last=channels_last, inference_mode=True)
        self._forward = _outputs(model, self.names)
        return self._runner(torch.compile(self._forward) if self.prep == "compile"
                            else self._forward)  # fmt: skip

    def _runner(self, forward: Callable) -> Callable[[Tensor], dict[str, Tensor]]:
        precision, inference = self.precision, self.prep != "none"

        def run(x: Tensor) -> dict[str, Tensor]:
            grad = torch.inference_mode() if inference else torch.no_grad()
            with grad, _autocast(x.device.type, precision):
                out = forward(x)
            # Inference tensors cannot be saved for backward; the losses may need to.
            return {k: v.clone() for k, v in out.items()} if inference else out

        return run

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """Outputs for a batch; the first call compares them with the plain teacher's."""
        if self.checked is None:
            return self.check(x)
        return self._run(x)

    def check(self, x: Tensor) -> dict[str, Tensor]:
        """Compares the prepared teacher with the plain one on ``x``; falls back on a mismatch.

        Returns:
            The outputs for ``x`` of the teacher that runs from now on.
        """
        if self.checked is not None:
            return self._run(x)
        plain = self._plain(x)
        start = time.perf_counter()
        try:
            prepared = self._run(x)
        except Exception as exc:  # e.g. torch.compile without a working C++ compiler
            self._fall_back(_why(exc))
            return plain
        self.info["first_batch_s"] = round(time.perf_counter() - start, 3)
        outputs = (*plain.values(), *prepared.values())
        half = any(v.dtype in (torch.float16, torch.bfloat16) for v in outputs)
        tolerance = TOLERANCE["half" if half else "float32"]
        error = _max_error(prepared, plain)
        self.info.update(max_error=float(f"{error:.3g}"), tolerance=tolerance)
        if not error <= tolerance:  # NaN too
            self._fall_back(f"outputs differ from the plain teacher's by {error:.3g} relative "
                            f"(tolerance {tolerance:g})")  # fmt: skip
            return plain
        self.checked = True
        if self.asked == "auto":
            self._settle(x, plain)
        log.info("teacher prepared (%s): %s", self.prep, self.summary())
        return prepared

    def _settle(self, x: Tensor, plain: dict[str, Tensor]) -> None:
        """``auto``, once ``fold`` has passed its check: compiles where the job is long enough.

        The compiled forward runs unless it differs from the plain teacher or measures clearly
        slower than the folded one on ``x`` (by more than :data:`SLOWER`: one batch's timing is
        noisy, and a compile already paid for costs nothing more); the info says why.
        """
        folded_s = _seconds(self._run, x)
        estimate = folded_s * self.forwards
        auto = {
            "forward_s": round(folded_s, 4),
            "forwards": self.forwards,
            "estimated_teacher_s": round(estimate, 1),
            "compile_after_s": self.compile_after_s,
        }
        self.info["auto"] = auto
        if self.cached is not None:
            auto["decision"] = f"{self.cached}: the teacher cache holds its outputs"
            if self.cached == "fold":
                return
        elif estimate < self.compile_after_s:
            auto["decision"] = "fold: too short a job to pay for a compile"
            return
        start = time.perf_counter()
        try:
            compiled = self._runner(torch.compile(self._forward))
            out = compiled(x)
            auto["compile_s"] = round(time.perf_counter() - start, 1)
            error = _max_error(out, plain)
            compiled_s = _seconds(compiled, x)
        except Exception as exc:  # e.g. no working C++ compiler: the folded teacher stays
            why = _why(exc)
            auto["decision"] = f"fold: compile failed ({why})"
            log.warning("stage.teacher_prep=auto: compile failed (%s); the folded teacher runs",
                        why)  # fmt: skip
            return
        auto.update(compiled_forward_s=round(compiled_s, 4),
                    compiled_max_error=float(f"{error:.3g}"))  # fmt: skip
        if not error <= self.info["tolerance"]:
            auto["decision"] = f"fold: the compiled outputs differ by {error:.3g} relative"
        elif compiled_s > SLOWER * folded_s and self.cached is None:
            auto["decision"] = "fold: the compiled forward measured slower"
        else:
            auto["decision"] = auto.get("decision", "compile: estimated to pay for its compile")
            self._run, self.prep = compiled, "compile"
            self.info.update(prep="compile", max_error=max(self.info["max_error"], error))

    def _fall_back(self, why: str) -> None:
        precision = "auto" if self.precision_auto is not None else self.precision
        asked = f"stage.teacher_prep={self.asked}" + (
            f" stage.teacher_precision={precision}" if precision else ""
        )
        log.warning("%s not used (%s): the plain teacher runs", asked, why)
        self.info = {"prep": "none", "precision": None, "fallback": f"{asked}: {why}"}
        self._run, self.checked = self._plain, False

    @torch.no_grad()
    def _plain(self, x: Tensor) -> dict[str, Tensor]:
        return _outputs(self.plain, self.names)(x)

    def key(self, prep: str | None = None) -> dict:
        """What the teacher's outputs depend on, for the teacher cache's key.

        Args:
            prep: The key the outputs would have under this preparation instead (``auto``
                looks for the cache of either).
        """
        key = {k: self.info.get(k) for k in ("prep", "precision", "channels_last")}
        return key if prep is None else {**key, "prep": prep}

    def summary(self) -> str:
        """One line: what was prepared and how close it came to the plain teacher."""
        i = self.info
        parts = []
        if "folded" in i:
            parts.append(f"{i['folded']} BatchNorms folded, {i['left']} left"
                         + (f" (untraced stages {', '.join(i['untraced'])})" if i["untraced"]
                            else ""))  # fmt: skip
            parts.append("channels-last" if i["channels_last"] else "contiguous")
            parts.append("inference mode")
        if self.prep == "compile":
            first = i["auto"].get("compile_s", 0) if "auto" in i else i.get("first_batch_s", 0)
            parts.append(f"compiled (first batch {first:.1f} s)")
        if "auto" in i:
            parts.append(f"auto: {i['auto']['decision']} (estimated teacher time "
                         f"{i['auto']['estimated_teacher_s']:.0f} s, compiles from "
                         f"{i['auto']['compile_after_s']:g} s)")  # fmt: skip
        parts.append(f"precision {self.precision or 'as the student'}"
                     + (" (auto)" if self.precision_auto is not None else ""))  # fmt: skip
        if "max_error" in i:
            parts.append(f"outputs within {i['max_error']:.2g} of the plain teacher's "
                         f"(tolerance {i['tolerance']:g})")  # fmt: skip
        return ", ".join(parts)


def _fold(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """``fold_batchnorm``, also through a wrapper that re-normalises the teacher's input.

    ``distillation.NormalisedTeacher`` holds the teacher as ``.teacher``: its copy gets the
    folded teacher, so the re-normalisation stays in front of it.
    """
    inner = getattr(model, "teacher", None)
    if isinstance(model, DistillModel) or not isinstance(inner, DistillModel):
        return fold_batchnorm(model)
    folded, report = fold_batchnorm(inner)
    wrapper = copy.copy(model)
    wrapper._modules = {**model._modules, "teacher": folded}  # the original keeps its teacher
    return wrapper, report


def _outputs(model: DistillModel, names: tuple[str, ...]) -> Callable[[Tensor], dict[str, Tensor]]:
    def forward(x: Tensor) -> dict[str, Tensor]:
        if not names:
            return {"logits": model(x)}
        logits, feats = model.forward_with_features(x)
        return {"logits": logits, **{name: feats[name] for name in names}}

    return forward


def _autocast(device_type: str, precision: str | None) -> contextlib.AbstractContextManager:
    if precision is None:
        return contextlib.nullcontext()  # the surrounding autocast, the student's
    if precision == "float32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=getattr(torch, precision))


def _seconds(run: Callable[[Tensor], Any], x: Tensor, reps: int = 3) -> float:
    """Wall seconds of a call of ``run`` on ``x``, outputs complete: the fastest of ``reps``."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run(x)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        best = min(best, time.perf_counter() - start)
    return best


def _is_channels_last(model: torch.nn.Module) -> bool:
    # every conv: a 1x1 kernel's weight counts as both layouts
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return bool(convs) and all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs
    )


def _why(exc: Exception) -> str:
    """One line for a preparation that failed: the exception's type and its message, cut short."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def _max_error(prepared: dict[str, Tensor], plain: dict[str, Tensor]) -> float:
    """The largest :func:`_relative_error` over the plain teacher's outputs."""
    return max(_relative_error(prepared[k], plain[k]) for k in plain)


def _relative_error(prepared: Tensor, plain: Tensor) -> float:
    plain = plain.float()
    scale = max(1.0, plain.abs().max().item()) if plain.numel() else 1.0
    return (prepared.float() - plain).abs().max().item() / scale if plain.numel() else 0.0
