"""BatchNorm folded into the convolution before it, for a model that only runs in eval mode.

    distill-cli distill stage.teacher_prep=fold   # the frozen teacher, folded (auto starts here)

In eval mode a BatchNorm is a per-channel affine map with constant coefficients, so a
convolution followed directly by one equals a single convolution with rescaled weights and a
shifted bias: one pass over the activations instead of two. Each stage of the model is traced
with ``torch.fx`` and every ``Conv2d -> BatchNorm2d`` pair whose convolution feeds nothing else
is replaced by one ``Conv2d``. The stages keep their names and outputs, so ``forward`` and
``forward_with_features`` give the same values (within float rounding). A BatchNorm that does
not read a convolution's output directly (the pre-activation BatchNorms of a Wide ResNet, the
BatchNorm after a residual sum) stays as it is; so does every stage that cannot be traced.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from distill_cli.models.interface import DistillModel


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
    report = FoldReport()
    untraced = []
    for name, stage in list(folded_model.stages.items()):
        count = _count_batchnorms(stage)
        if not count:
            continue
        try:
            new_stage, folded = _fold_stage(stage)
        except Exception:  # fx cannot trace this stage (data-dependent control flow): keep it
            untraced.append(name)
            report.left += count
            continue
        folded_model.stages[name] = new_stage
        report.folded += folded
        report.left += count - folded
    report.untraced = tuple(untraced)
    return folded_model.eval(), report


def _count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def _fold_stage(stage: nn.Module) -> tuple[nn.Module, int]:
    """The stage as a traced graph with its foldable conv-BN pairs merged; the pairs merged."""
    from torch import fx

    graph_module = fx.symbolic_trace(stage)
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(graph_module.graph.nodes):
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (
            isinstance(modules.get(node.target), nn.BatchNorm2d)
            and isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules.get(source.target), nn.Conv2d)
            and len(source.users) == 1  # the conv's output feeds the BatchNorm alone
            and calls[source.target] == calls[node.target] == 1  # modules used once
            and modules[node.target].running_mean is not None
        ):
            continue
        fused = fold_conv_bn(modules[source.target], modules[node.target])
        _replace(graph_module, source.target, fused)
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded += 1
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module, folded


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
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
