"""Backbones with their weights: EfficientNet-Lite0's shipped ImageNet weights really
classify (the pretrained offline backbone of the demo)."""

from __future__ import annotations

import numpy as np
import torch

from voxelflow.pipeline.models import FeatureExtractor, load_backbone


def test_efficientnet_lite0_is_really_pretrained():
    from skimage import data, transform

    def square_224(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        s = min(h, w)
        crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        out = transform.resize(crop, (224, 224), anti_aliasing=True, preserve_range=True)
        return np.round(out).astype(np.uint8)

    backbone = load_backbone("efficientnet_lite0", "imagenet")
    logits = FeatureExtractor(backbone, ["_fc"])(
        torch.from_numpy(np.stack([square_224(data.chelsea()), square_224(data.coffee())])))[0]
    top = logits.argmax(1).tolist()
    assert 281 <= top[0] <= 285, f"chelsea (a tabby cat) classified as {top[0]}"
    assert top[1] in (967, 968), f"coffee (an espresso cup) classified as {top[1]}"
