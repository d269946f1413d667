"""The autoencoder network on its own (training is tests/stages/test_train.py): shapes,
torchvision parameter names, and the decoder's start as the encoder's adjoint."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.models.autoencoder import ResNetAutoencoder, read_checkpoint


def test_shapes_names_and_adjoint_start():
    torch.manual_seed(0)
    net = ResNetAutoencoder(torchvision.models.resnet50()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert net.encoder.spatial(x).shape == (2, 2048, 2, 2)
        assert net.encoder(x).shape == (2, 2048)
        assert net(x).shape == x.shape
    # The encoder's parameters carry torchvision's names (a plain resnet50 minus fc).
    missing, unexpected = torchvision.models.resnet50().load_state_dict(
        net.encoder.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    # The stem's 7x7 conv mirrored: channels swapped, kernel flipped, scaled sqrt(3/64).
    w = net.encoder.conv1.weight
    want = w.transpose(0, 1).flip(2, 3) * math.sqrt(3 / 64)
    torch.testing.assert_close(net.decoder.conv1.weight, want)
    # A 1x1 conv mirrored is its transpose; each mirrored block starts as its shortcut.
    block, up = net.encoder.layer4[2], net.decoder.layer4[0]
    torch.testing.assert_close(up.conv1.weight, block.conv3.weight.transpose(0, 1))
    assert float(up.bn3.weight.detach().abs().max()) == 0.0


def test_read_checkpoint_refuses_a_plain_state_dict(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(InputError, match="plain state_dict .* not a voxelflow autoencoder"):
        read_checkpoint(path)
