"""Predictions from a checkpoint for callers that hold images, not tensors (no MLflow here)."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import pandas as pd
import torch
from PIL import Image

from soups import SoupsError
from soups.data import resized
from soups.evaluate import EvalSet, predict
from soups.models import Checkpoint


class Predictor:
    """A checkpoint's model, ready for images: applies the checkpoint's own size and normalisation."""

    def __init__(self, ckpt: Checkpoint, device: torch.device | str = "cpu", batch_size: int = 64):
        self.ckpt, self.device, self.batch_size = ckpt, torch.device(device), batch_size
        self.model = ckpt.build().to(self.device).eval()

    def images(self, data) -> np.ndarray:
        """uint8 N x S x S x 3 from a DataFrame column `image` of base64 strings or raw bytes,
        a list of those, or an array N x H x W x 3 of uint8 pixels."""
        if isinstance(data, pd.DataFrame):
            if "image" not in data.columns:
                raise SoupsError(
                    f"input needs a column `image` (base64 image bytes), got {list(data.columns)}"
                )
            data = data["image"].tolist()
        if isinstance(data, np.ndarray) and data.ndim == 4:
            return np.stack(
                [resized(Image.fromarray(np.asarray(x, np.uint8)), self.ckpt.img_size) for x in data]
            )
        return np.stack([resized(decode_bytes(item, k), self.ckpt.img_size) for k, item in enumerate(data)])

    def logits(self, pixels: np.ndarray) -> torch.Tensor:
        evalset = EvalSet(
            torch.from_numpy(pixels), torch.zeros(len(pixels), dtype=torch.long), self.ckpt.num_classes
        )
        return predict(self.model, evalset, self.ckpt.mean, self.ckpt.std, self.batch_size, self.device)

    def probabilities(self, pixels: np.ndarray) -> torch.Tensor:
        return self.logits(pixels).softmax(1)

    def predict(self, data) -> pd.DataFrame:
        """One row per image: `label` (class index), `class_name`, `probability`."""
        probs = self.probabilities(self.images(data))
        p, label = probs.max(1)
        return pd.DataFrame(
            {
                "label": label.numpy(),
                "class_name": [self.ckpt.classes[j] for j in label],
                "probability": p.numpy(),
            }
        )


def decode_bytes(item, index: int) -> Image.Image:
    try:
        raw = item if isinstance(item, bytes | bytearray) else base64.b64decode(item, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            return img.convert("RGB")
    except (binascii.Error, OSError, ValueError, TypeError) as e:
        raise SoupsError(f"input image {index} cannot be decoded: {e}") from None


def encode_file(path) -> str:
    """base64 text of an image file, the form the served model takes."""
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()
