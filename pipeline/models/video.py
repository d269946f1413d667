"""Video classification models: which they are, their normalisation, their weights' name.

torchvision's video models (``torchvision.models.video``: ``r3d_18``, ``mc3_18``,
``r2plus1d_18``, ``s3d``, ``mvit_v1_b``, ``mvit_v2_s``, ``swin3d_t/s/b``) take a clip,
a float tensor ``(batch, channels, time, H, W)``.  Their pretrained weights are
Kinetics-400 (``--weights kinetics``, read from the torch cache like ImageNet
weights); ``random:SEED`` and state_dict files work as for image models.

Normalisation: the one of the model's Kinetics weights (``weights.transforms()`` of
``VideoClassification``: mean (0.43216, 0.394666, 0.37645), std (0.22803, 0.22145,
0.216989) for r3d/mc3/r2plus1d/s3d, 0.45/0.225 for MViT, the ImageNet values for
Swin3D), whatever the weights loaded, so that a random or fine-tuned copy sees the
same inputs.  No resize or crop: the frames are used as stored.
"""

from __future__ import annotations

import functools

KINETICS = "kinetics"  # --weights name of the pretrained (Kinetics-400) video weights
DEFAULT_CLIP_FRAMES = 16  # torchvision's video references train on 16-frame clips ...
DEFAULT_CLIP_FPS = 15.0  # ... sampled at 15 fps (references/video_classification)


@functools.lru_cache(maxsize=1)
def video_models() -> frozenset[str]:
    """Names of torchvision's video classification models."""
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models.video))


def is_video_model(model: str) -> bool:
    """Whether ``model`` takes clips ``(B, C, T, H, W)`` rather than images."""
    return model in video_models()


def default_weights(model: str) -> str:
    """``kinetics`` for a video model, ``imagenet`` for any other."""
    return KINETICS if is_video_model(model) else "imagenet"


def video_normalisation(model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per RGB channel of ``model``'s Kinetics weights' transforms
    (values on the 0-1 scale; nothing is downloaded)."""
    import torchvision

    transforms = torchvision.models.get_model_weights(model).DEFAULT.transforms()
    return (tuple(float(m) for m in transforms.mean), tuple(float(s) for s in transforms.std))
