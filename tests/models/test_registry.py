"""The model registry: layer names of a model, from Python and from the CLI."""

from __future__ import annotations

import pytest

from voxelflow import cli
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.models import list_layers


def test_list_layers(capsys):
    assert "classifier.4" in list_layers("vgg16")
    assert cli.main(["features", "--list-layers", "resnet50"]) == 0
    out = capsys.readouterr()
    assert "avgpool" in out.out.split() and "layer4.2.relu_2" in out.out.split()
    assert "default layer: avgpool" in out.err
    with pytest.raises(InputError, match="efficientnet_lite0"):
        list_layers("efficientnet_lite")
