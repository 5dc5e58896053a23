"""BatchNorm folded into the convolution before it, for a model that only runs in eval mode.

    distill-cli distill stage.teacher_prep=fold   # the frozen teacher, folded (auto starts here)

In eval mode a BatchNorm is a per-channel affine map with constant coefficients, so a
convolution followed directly by one equals a single convolution with rescaled weights and a
shifted bias: one pass over the activations instead of two. Each stage of the model is traced
with ``torch.fx`` to find every ``Conv2d -> BatchNorm`` pair whose convolution feeds nothing
else; the convolution is then replaced by the folded one and the BatchNorm by what follows it
(nothing, or the activation of timm's fused ``BatchNormAct2d``). The modules are swapped in
place, so the model's own code runs as before (``forward``, ``forward_with_features``, timm's
``forward_intermediates``) and gives the same values within float rounding. A BatchNorm that
does not read a convolution's output directly (the pre-activation BatchNorms of a Wide ResNet,
the BatchNorm after a residual sum) stays as it is; a module that cannot be traced is searched
through its children, and the report names it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distill_cli.models.interface import DistillModel

log = logging.getLogger("distill_cli")


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: BatchNorms folded and left, stages it could not trace."""

    folded: int = 0
    left: int = 0
    untraced: tuple[str, ...] = ()


def fold_batchnorm(model: DistillModel) -> tuple[DistillModel, FoldReport]:
    """A copy of ``model`` with each BatchNorm that follows a convolution folded into it.

    Args:
        model: A model in eval mode; it is not changed.

    Returns:
        (the folded copy in eval mode, with gradients off; the report).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode: its BatchNorm statistics")
    folded_model = copy.deepcopy(model).requires_grad_(False)
    tracer = _Tracer(*model.fx_leaves())
    report, untraced = FoldReport(), []
    for name, stage in folded_model.stages.items():
        if _count_batchnorms(stage):
            report.folded += _fold_module(stage, name, tracer, untraced)
    left = [n for n, m in folded_model.named_modules() if _is_batchnorm(m)]
    report.left, report.untraced = len(left), tuple(untraced)
    if left and report.folded:
        log.info("fold: %d BatchNorms left unfolded (no convolution directly before them), "
                 "e.g. %s", len(left), ", ".join(left[:3]))  # fmt: skip
    return folded_model.eval(), report


def _is_batchnorm(module: nn.Module | None) -> bool:
    """A BatchNorm over conv maps: torch's, timm's ``BatchNormAct2d`` and frozen relatives."""
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) or (
        type(module).__name__ in _FROZEN and hasattr(module, "running_var")
    )


# Frozen BatchNorms (torchvision's, timm's with an activation): buffers in place of parameters.
_FROZEN = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


def _count_batchnorms(module: nn.Module) -> int:
    return sum(_is_batchnorm(m) for m in module.modules())


class _Tracer:
    """``torch.fx`` tracing that stops at convolutions, BatchNorms and the model's own leaves."""

    def __init__(self, leaves: tuple[type[nn.Module], ...] = (), functions: tuple = ()):
        self.leaves, self.functions = (nn.Conv2d, *leaves), functions

    def trace(self, module: nn.Module) -> Any:
        """The graph of ``module.forward``; raises whatever fx raises on untraceable code."""
        from torch import fx

        leaves = self.leaves

        class Tracer(fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return (
                    isinstance(m, leaves) or _is_batchnorm(m) or super().is_leaf_module(m, qualname)
                )

        return Tracer(autowrap_functions=self.functions).trace(module)


def _fold_module(module: nn.Module, name: str, tracer: _Tracer, untraced: list[str]) -> int:
    """Folds the pairs of ``module`` in place; an untraceable module's children one by one."""
    try:
        graph = tracer.trace(module)
    except Exception:  # data-dependent control flow, an unsupported op: try its parts
        children = [(n, c) for n, c in module.named_children() if _count_batchnorms(c)]
        if children and not _is_batchnorm(module):
            untraced.append(name)
        return sum(_fold_module(c, f"{name}.{n}", tracer, []) for n, c in children)
    return _fold_graph(module, graph)


def _fold_graph(root: nn.Module, graph: Any) -> int:
    """Swaps each foldable conv-BN pair of ``graph`` (traced from ``root``); the pairs swapped."""
    from torch import fx

    modules = dict(root.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not (
            _is_batchnorm(bn)
            and isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
            and len(source.users) == 1  # the conv's output feeds the BatchNorm alone
            and calls[source.target] == calls[node.target] == 1  # modules used once
            and bn.running_mean is not None
        ):
            continue
        _replace(root, source.target, fold_conv_bn(modules[source.target], bn))
        _replace(root, node.target, _after_norm(bn))
        folded += 1
    return folded


def _after_norm(bn: nn.Module) -> nn.Module:
    """What remains of a folded BatchNorm: nothing, or timm's dropout and activation after it."""
    parts = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
             if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]  # fmt: skip
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts) if parts else nn.Identity()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """One convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    The coefficients are computed in float64 and rounded once, to the convolution's dtype.
    """
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    fused = copy.deepcopy(conv)
    weight = conv.weight.double() * scale.view(-1, *[1] * (conv.weight.dim() - 1))
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return fused


def _replace(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
