"""What the served model and `infer` take from callers: images as base64 bytes or uint8 arrays;
everything else refused with the row and the reason, never guessed at."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from soups import SoupsError
from soups.models import Checkpoint, create_model
from soups.predict import MAX_PIXELS, Predictor, decode_bytes


@pytest.fixture(scope="module")
def predictor():
    model = create_model("test_efficientnet", 3)
    ckpt = Checkpoint(
        model.state_dict(), "test_efficientnet", 3, ["a", "b", "c"], 24, "s", [0.5] * 3, [0.5] * 3
    )
    return Predictor(ckpt)


def png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def frame(*images: str) -> pd.DataFrame:
    return pd.DataFrame({"image": list(images)})


def test_good_images_and_uint8_arrays_are_predicted(predictor):
    out = predictor.predict(frame(png(Image.new("RGB", (30, 20), (200, 10, 10)))))
    assert list(out.columns) == ["label", "class_name", "probability"] and len(out) == 1
    assert len(predictor.predict(np.zeros((2, 16, 16, 3), np.uint8))) == 2


@pytest.mark.parametrize(
    "data, said",
    [
        (frame(), "the request holds no images"),
        (np.zeros((0, 8, 8, 3), np.uint8), "the request holds no images"),
        (np.zeros((1, 8, 8, 3), np.float32), "input array has dtype float32: send uint8 pixels 0-255"),
        (np.zeros((1, 8, 8, 4), np.uint8), r"input array is 1x8x8x4: send N x H x W x 3 RGB pixels \(RGBA\?"),
        (np.zeros((8, 8, 3), np.uint8), "input array is 8x8x3: send N x H x W x 3"),
        (frame("not base64!"), "input image 0 cannot be decoded"),
        (pd.DataFrame({"img": ["x"]}), r"input needs a column `image`"),
    ],
)
def test_what_is_not_an_image_is_refused_with_the_row_and_reason(predictor, data, said):
    with pytest.raises(SoupsError, match=said):
        predictor.predict(data)


def test_a_decompression_bomb_is_refused_before_it_is_decoded(predictor):
    side = int(MAX_PIXELS**0.5) + 1
    bomb = png(Image.new("1", (side, side)))  # a few KB claiming over MAX_PIXELS pixels
    assert len(bomb) < 100_000
    good = png(Image.new("RGB", (8, 8)))
    with pytest.raises(SoupsError, match=rf"input image 1 is {side} x {side} pixels, over the limit"):
        predictor.predict(frame(good, bomb))


def test_transparency_is_composited_over_white_not_dropped():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black: a viewer shows white
    assert np.asarray(decode_bytes(png(clear), 0)).min() == 255
    half = Image.new("LA", (4, 4), (0, 128))
    assert 126 <= int(np.asarray(decode_bytes(png(half), 0))[0, 0, 0]) <= 128
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert np.asarray(decode_bytes(png(opaque), 0))[0, 0].tolist() == [10, 20, 30]
