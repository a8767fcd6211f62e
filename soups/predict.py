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
        a list of those, or an array N x H x W x 3 of uint8 pixels. Anything else is refused with
        the row and the reason: an empty request, another dtype or channel count (no guessing
        whether floats are 0-1 or 0-255), an image over MAX_PIXELS (a decompression bomb)."""
        if isinstance(data, pd.DataFrame):
            if "image" not in data.columns:
                raise SoupsError(
                    f"input needs a column `image` (base64 image bytes), got {list(data.columns)}"
                )
            data = data["image"].tolist()
        if len(data) == 0:
            raise SoupsError("the request holds no images")
        if isinstance(data, np.ndarray) and data.dtype != object:
            return np.stack([resized(Image.fromarray(x), self.ckpt.img_size) for x in pixel_rows(data)])
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
                "probability": p.double().numpy(),  # the signature's double
            }
        )


# The largest image decoded (width x height): the model sees img_size pixels anyway, and a small
# PNG can claim billions of pixels (PIL warns only at 89 M and refuses at 179 M).
MAX_PIXELS = 40_000_000


def pixel_rows(data: np.ndarray) -> np.ndarray:
    """An N x H x W x 3 uint8 array as it is, or a one-line reason it is not one."""
    if data.ndim != 4 or data.shape[-1] != 3:
        got = "x".join(map(str, data.shape))
        rgba = data.ndim == 4 and data.shape[-1] == 4
        hint = " (RGBA? drop or composite the alpha channel)" if rgba else ""
        raise SoupsError(f"input array is {got}: send N x H x W x 3 RGB pixels{hint}")
    if data.dtype != np.uint8:
        raise SoupsError(
            f"input array has dtype {data.dtype}: send uint8 pixels 0-255 (floats are not guessed at: "
            "0-1 and 0-255 both occur)"
        )
    return data


def decode_bytes(item, index: int) -> Image.Image:
    """RGB pixels of one encoded image; transparency composited over white, as a viewer shows it
    (a plain conversion would turn transparent pixels into whatever colour they hide, often black)."""
    try:
        raw = item if isinstance(item, bytes | bytearray) else base64.b64decode(item, validate=True)
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise SoupsError(
                    f"input image {index} is {img.width} x {img.height} pixels, over the limit of "
                    f"{MAX_PIXELS:,}: send it resized"
                )
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return img.convert("RGB")
    except (binascii.Error, OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
        raise SoupsError(f"input image {index} cannot be decoded: {e}") from None


def encode_file(path) -> str:
    """base64 text of an image file, the form the served model takes."""
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()
