"""Write Fashion-MNIST's images as class folders (`<out>/<class>/<n>.png`), the layout most users
have (`-P layout=imagefolder`): to try the README's "your own data" walk-through without data of
your own, and for the benchmark that compares the same images as IDX files and as folders.

    python scripts/fashion_mnist_folders.py OUT [--per-class N] [--idx /usr/share/datasets/fashion-mnist]

Takes the first N images of each class from the training file (the test file is left out: the
folder layout cuts its own val and test splits)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from soups.layouts.fashion_mnist import CLASSES, FILES, read_idx


def write_folders(idx: Path, out: Path, per_class: int) -> int:
    images, labels = (read_idx(idx / name) for name in FILES["train"])
    written = 0
    for c, name in enumerate(CLASSES):
        folder = out / name.replace("/", "-")  # `T-shirt/top` is one folder, not two
        folder.mkdir(parents=True, exist_ok=True)
        for n, k in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(images[k]).save(folder / f"{n:05d}.png")
            written += 1
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the class folders into")
    parser.add_argument("--per-class", type=int, default=400, help="images per class (default 400)")
    parser.add_argument("--idx", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()
    print(f"{write_folders(args.idx, args.out, args.per_class)} images under {args.out}")
