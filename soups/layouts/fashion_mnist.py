"""Fashion-MNIST's IDX files (`train-images-idx3-ubyte.gz`, ..., `t10k-...`), as Debian's
`dataset-fashion-mnist` installs them: the train file is the pool, the t10k files the test split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from soups import SoupsError
from soups.layouts.registry import Layout, register
from soups.samples import Samples

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error) as e:
        raise SoupsError(f"cannot read IDX file {path}: {e}") from None


def read(root: Path) -> dict[str, Samples | None]:
    missing = [n for pair in FILES.values() for n in pair if not (root / n).is_file()]
    if missing:
        raise SoupsError(
            f"Fashion-MNIST files missing in {root}: {', '.join(missing)} "
            "(`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)"
        )
    out: dict[str, Samples | None] = {"val": None}
    for part, (images, labels) in FILES.items():
        pixels, y = read_idx(root / images), read_idx(root / labels)
        if len(pixels) != len(y):
            raise SoupsError(f"{root / images} has {len(pixels)} images but {labels} {len(y)} labels")
        keys = [f"{images}:{r}" for r in range(len(y))]
        out["pool" if part == "train" else "test"] = Samples(
            keys, y.astype(np.int64), keys, CLASSES, root, pixels, np.arange(len(y))
        )
    return out


# No inputs of its own: the t10k files are the test split, which `infer` predicts by default.
register(
    Layout("fashion-mnist", "Fashion-MNIST IDX files in one folder; `infer` predicts its test split", read)
)
