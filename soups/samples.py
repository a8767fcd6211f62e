"""What a dataset layout makes of a folder: `Samples` (keys, labels, groups, classes), and the
checked data folder. Below both the layouts and the splitter (`soups.data`), which build on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from soups import SoupsError


@dataclass(frozen=True)
class Samples:
    """Images of one dataset part. `keys` identify each image stably (a path relative to `root`,
    or `<file>:<row>` for array datasets); `groups` keep related images in the same split."""

    keys: list[str]
    labels: np.ndarray
    groups: list[str]
    classes: list[str]
    root: Path
    pixels: np.ndarray | None = None  # in-memory images (IDX files), indexed by `rows`
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: Sequence[int] | np.ndarray) -> Samples:
        idx = np.asarray(idx, dtype=np.int64)
        return replace(
            self,
            keys=[self.keys[j] for j in idx],
            labels=self.labels[idx],
            groups=[self.groups[j] for j in idx],
            rows=None if self.rows is None else self.rows[idx],
        )

    def path(self, j: int) -> Path:
        return self.root / self.keys[j]

    def read(self, j: int) -> Image.Image:
        """Decode image j as RGB, or raise SoupsError naming the file."""
        if self.pixels is not None:
            return Image.fromarray(self.pixels[self.rows[j]]).convert("RGB")
        path = self.path(j)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # convert() forces a full decode: truncation shows here
        except Exception as e:  # PIL raises several types for corrupt files
            raise SoupsError(f"cannot read image {path}: {e}") from None


def data_root(data: str | Path) -> Path:
    root = Path(data).expanduser()
    if not str(data) or not root.is_dir():
        raise SoupsError(
            f"data folder {str(data)!r} not found: for the demo's Fashion-MNIST run `make data` "
            "(installs Debian's dataset-fashion-mnist there); for your own images pass -P data=<folder> "
            "(one sub-folder per class: -P layout=imagefolder; README: Your own data)"
        )
    return root
