"""Write Fashion-MNIST's images as class folders, the layout most users have (`-P
layout=imagefolder`): to try the README's "your own data" walk-through without data of your own,
and for the benchmark that compares the same images as IDX files and as folders.

    python scripts/fashion_mnist_folders.py OUT [--per-class N] [--idx /usr/share/datasets/fashion-mnist]
    python scripts/fashion_mnist_folders.py OUT --parts   # OUT/train/<class>, OUT/test/<class>

Without --parts: `OUT/<class>/<n>.png`, the first N images of each class of the training file (the
folder layout cuts its own val and test splits). With --parts: the training file under `train/`
and the test file under `test/`, every image, so that the folders hold exactly the IDX files'
images and test split."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from soups.layouts.fashion_mnist import CLASSES, FILES, read_idx


def write_folders(idx: Path, out: Path, per_class: int, part: str = "train") -> int:
    images, labels = (read_idx(idx / name) for name in FILES[part])
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
    parser.add_argument("--parts", action="store_true", help="every image, as train/ and test/ folders")
    args = parser.parse_args()
    if args.parts:
        n = sum(write_folders(args.idx, args.out / part, 10**6, part) for part in ("train", "test"))
    else:
        n = write_folders(args.idx, args.out, args.per_class)
    print(f"{n} images under {args.out}")
