"""Networks and their weights (no workspace I/O): which backbones exist and their layers
(:mod:`.registry`), weight files (:mod:`.weights`), a backbone with its weights loaded
(:mod:`.backbone`), the feature extractor (:mod:`.extractor`) and the ResNet-50
autoencoder network and checkpoints (:mod:`.autoencoder`).
"""

from voxelflow.pipeline.models.autoencoder import (ResNetAutoencoder, load_encoder,
                                                   read_checkpoint)
from voxelflow.pipeline.models.backbone import Backbone, build_autoencoder, load_backbone
from voxelflow.pipeline.models.extractor import (ExtractorSpec, FeatureExtractor, check_device,
                                                 worker_extractor)
from voxelflow.pipeline.models.registry import (available_models, check_layers, check_model,
                                                default_layer, list_layers)
from voxelflow.pipeline.models.weights import parse_weights, sha256_file

__all__ = [
    "Backbone", "ExtractorSpec", "FeatureExtractor", "ResNetAutoencoder", "available_models",
    "build_autoencoder", "check_device", "check_layers", "check_model", "default_layer",
    "list_layers", "load_backbone", "load_encoder", "parse_weights", "read_checkpoint",
    "sha256_file", "worker_extractor",
]
