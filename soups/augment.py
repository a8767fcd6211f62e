"""Training augmentations by name. They act on uint8 HxWx3 images already at the model's size;
normalisation happens on the batch (`data.model_input`), the same for training and evaluation,
so evaluation needs no pipeline at all and stays deterministic."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from soups import SoupsError


def _none(A: ModuleType, size: int) -> list:
    return []


def _light(A: ModuleType, size: int) -> list:
    return [A.HorizontalFlip(p=0.5)]


def _medium(A: ModuleType, size: int) -> list:
    return [
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-10, 10), p=0.7),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    ]


def _heavy(A: ModuleType, size: int) -> list:
    return [
        A.RandomResizedCrop(size=(size, size), scale=(0.5, 1.0), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.85, 1.15), translate_percent=(-0.1, 0.1), rotate=(-15, 15), p=0.7),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, p=0.8),
        A.CoarseDropout(
            num_holes_range=(1, 4), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5
        ),
    ]


# The recipe's `aug` and `oversample_aug` take their choices from here: albumentations is imported
# by `pipeline` alone, so reading the names costs nothing.
PIPELINES = {"none": _none, "light": _light, "medium": _medium, "heavy": _heavy}


def pipeline(name: str, size: int) -> Any:
    """The named training pipeline (an `albumentations.Compose`) for `size`-pixel images, or None
    for `none`. Unseeded: the training batches seed it image by image (`batches.SeededBatches`)."""
    import albumentations as A

    if name not in PIPELINES:
        raise SoupsError(f"unknown augmentation aug={name!r}: use one of {', '.join(PIPELINES)}")
    steps = PIPELINES[name](A, size)
    return A.Compose(steps) if steps else None
