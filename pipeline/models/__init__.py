"""Plain PyTorch models; training, logging and serving wrap them elsewhere."""
from .cnn import AudioCNN
from .heads import EmbeddingClassifier
from .resnet import SpecResNet
from .unet import MaskUNet
from .mae import (
    MAE_PRESETS,
    AudioMAEViT,
    build_mae,
    mae_base,
    mae_demo,
    mae_huge,
    mae_large,
    mae_medium,
    mae_small,
    mae_tiny,
)

__all__ = [
    "AudioCNN",
    "AudioMAEViT",
    "EmbeddingClassifier",
    "MaskUNet",
    "SpecResNet",
    "MAE_PRESETS",
    "build_mae",
    "mae_base",
    "mae_demo",
    "mae_huge",
    "mae_large",
    "mae_medium",
    "mae_small",
    "mae_tiny",
]
