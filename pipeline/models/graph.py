"""The graph a feature extractor runs: a backbone traced up to the requested nodes.

:func:`build_graph` is torchvision's ``create_feature_extractor`` (an FX trace of the
model's ``forward``, cut after the last requested node) plus one rewrite that gives
back what tracing loses.  Python's ``out += identity`` in a residual block (ResNet,
the video ResNets, MobileNet's ``x + block(x)``) adds in place in eager mode, but an
FX trace records it as ``out + identity``: one more activation allocated, page-faulted
and freed per block (a 16 x 256 x 56 x 56 float32 tensor is 51 MB): the traced
ResNet-50 ran at 0.934 of the model's own forward on 2 CPU cores, and the features
stage at 0.90-0.955 of a bare ``model(x)`` in ``benchmarks/features.py`` (0.99 with
the rewrite, ``docs/performance.md``).  :func:`add_in_place` writes such a sum into the operand
that nothing else reads: a conv, norm or linear layer's fresh output whose only user
is the sum.  IEEE addition is commutative, so the values are bitwise those of
``a + b``.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Sequence

__all__ = ["add_in_place", "build_graph", "sum_into_fresh"]


def build_graph(module: Any, layers: Sequence[str]) -> Any:
    """``torch.fx.GraphModule``: ``module`` traced up to ``layers`` (FX node names),
    returning ``{layer: tensor}``; sums into fresh outputs done in place
    (:func:`add_in_place`)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = create_feature_extractor(module, return_nodes={n: n for n in layers})
    add_in_place(graph)
    return graph


def sum_into_fresh(fresh: Any, other: Any) -> Any:
    """``fresh + other``, written into ``fresh`` when it is a tensor of the sum's shape
    and dtype (else an ordinary sum).  ``fresh`` must be a value nothing else reads."""
    import torch

    if (isinstance(fresh, torch.Tensor) and isinstance(other, torch.Tensor)
            and fresh.shape == other.shape and fresh.dtype == other.dtype
            and fresh.device == other.device and not fresh.requires_grad):
        return fresh.add_(other)
    return fresh + other


def add_in_place(graph: Any) -> int:
    """Rewrite ``a + b`` nodes of ``graph`` (a ``GraphModule``) to :func:`sum_into_fresh`
    into whichever operand is a fresh, otherwise unused output; returns how many.

    Fresh: made by a conv, batch/layer/group norm or linear layer (each returns a new
    tensor, never a view of its input), and read by this sum only (so not a returned
    node either).  Anything else (inputs, views, in-place activations that return
    their input, values read twice) is left alone.
    """
    targets = _sum_targets()
    modules = dict(graph.named_modules())
    rewritten = 0
    for node in graph.graph.nodes:
        if (node.op != "call_function" or node.target not in targets or node.kwargs
                or len(node.args) != 2):
            continue
        for fresh, other in (node.args, node.args[::-1]):
            if _is_fresh_and_only_summed(fresh, node, modules):
                node.target = sum_into_fresh
                node.args = (fresh, other)
                rewritten += 1
                break
    if rewritten:
        graph.recompile()
    return rewritten


def _sum_targets() -> tuple:
    """Out-of-place sums only: an FX ``operator.iadd`` already adds in place (and other
    readers of its left operand see the sum), so it is left as it is."""
    import torch

    return (operator.add, torch.add)


def _fresh_forwards() -> frozenset:
    """The ``forward`` methods of torch's layers that return a new tensor (never a view
    of their input): conv, batch/layer/group norm, linear.  A subclass that keeps one
    of these (torchvision's ``Conv3DSimple``) qualifies; one that overrides it does not."""
    from torch import nn

    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
              nn.BatchNorm3d, nn.Linear, nn.LayerNorm, nn.GroupNorm)
    return frozenset(cls.forward for cls in layers)


def _is_fresh_and_only_summed(value: Any, node: Any, modules: dict) -> bool:
    """``value`` is an FX node made by a fresh-output layer and read by ``node`` only."""
    import torch.fx

    if not isinstance(value, torch.fx.Node) or value.op != "call_module":
        return False
    layer = modules.get(value.target)
    return type(layer).forward in _fresh_forwards() and list(value.users) == [node]
