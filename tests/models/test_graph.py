"""The extractor's graph: residual sums written in place give bitwise the plain FX
trace's outputs, and sums whose operands something else reads are left alone."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from voxelflow.pipeline.models.graph import add_in_place, build_graph, sum_into_fresh


def _plain_trace(module: nn.Module, layers: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_feature_extractor(module, return_nodes={n: n for n in layers}).eval()


def _rewritten(graph) -> int:
    return sum(1 for n in graph.graph.nodes if n.target is sum_into_fresh)


@pytest.mark.parametrize("model, shape", [
    ("resnet18", (3, 3, 32, 32)),  # 8 basic blocks: bn2 + identity/downsample
    ("r3d_18", (2, 3, 4, 32, 32)),  # the video ResNet's `out += residual`
])
def test_residual_sums_in_place_equal_the_plain_trace_bitwise(model, shape):
    torch.manual_seed(0)
    net = torchvision.models.get_model(model).eval()
    plain = _plain_trace(net, ["flatten"])
    graph = build_graph(net, ["flatten"]).eval()
    assert _rewritten(graph) == 8
    x = torch.randn(shape)
    pooled = []  # the model's own eager forward (where `out += identity` is in place)
    net.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o.flatten(1)))
    with torch.inference_mode():
        want, got = plain(x)["flatten"], graph(x)["flatten"]
        net(x)
    assert torch.equal(got, want) and torch.equal(got, pooled[0])


def test_a_requested_operand_is_not_summed_into():
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    layers = ["layer1.0.bn2", "layer1.0.add", "layer1.1.add"]
    plain, graph = _plain_trace(net, layers), build_graph(net, layers).eval()
    # layer1.0's sum reads the requested bn2; layer1.1's does not, and is rewritten
    sums = {n.name: n.target for n in graph.graph.nodes if n.op == "call_function"}
    assert sums["add"] is not sum_into_fresh and sums["add_1"] is sum_into_fresh
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want, got = plain(x), graph(x)
    for layer in layers:
        assert torch.equal(got[layer], want[layer]), layer
    assert not torch.equal(got["layer1.0.bn2"], got["layer1.0.add"])


class _Shared(nn.Module):
    """Sums whose operands are read elsewhere, are inputs, or alias their input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU(inplace=True)
        self.keep = nn.Identity()

    def forward(self, x):
        c = self.conv(x)
        twice = c + x  # c is read again below
        y = self.act(self.keep(x)) + x  # an in-place activation returns its input
        return twice, c * 2, y


def test_sums_of_shared_or_aliased_operands_are_left_alone():
    module = _Shared().eval()
    graph = _plain_trace(module, ["add", "mul", "add_1"])
    assert add_in_place(graph) == 0
    x = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        got = graph(x.clone())
        c = module.conv(x)
    assert torch.equal(got["add"], c + x) and torch.equal(got["mul"], c * 2)


def test_sum_into_fresh_falls_back_when_shapes_or_dtypes_differ():
    a, b = torch.ones(2, 1), torch.ones(2, 3)
    assert sum_into_fresh(a, b).shape == (2, 3) and torch.equal(a, torch.ones(2, 1))
    h = torch.ones(2, dtype=torch.bfloat16)
    assert sum_into_fresh(h, torch.ones(2)).dtype == torch.float32
    assert torch.equal(h, torch.ones(2, dtype=torch.bfloat16))
    same = torch.ones(3)
    assert sum_into_fresh(same, torch.ones(3)) is same and torch.equal(same, torch.full((3,), 2.))
