"""What the layouts that read image files share: the image files under a folder, class folders,
paths a listing names (kept inside the dataset root), and every image under a root.

Keys are paths relative to the root as the user gave it, never resolved: a relative `data` path
and a dataset whose image folder is a link to another disk give the same keys as the real path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from soups import SoupsError
from soups.samples import Samples

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _images_under(folder: Path) -> list[Path]:
    """Image files under `folder`, hidden names below it left out (only below: a root reached as
    `../data` or through `~/.cache` is not hidden). Linked folders are followed (images kept on
    another disk; `rglob` skips them before Python 3.13), each real folder once (a loop ends)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        if (real := os.path.realpath(top)) in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            Path(top, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS
        ]
    return sorted(p for p in found if p.is_file())


def class_folders(folder: Path, base: Path, classes: list[str] | None = None) -> Samples:
    """Images under `folder/<class>/`, keyed by their path relative to `base`."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise SoupsError(f"no class folders in {folder} (imagefolder layout: <root>/<class>/<image>)")
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SoupsError(f"{folder} has class folders {unknown} that the training classes lack")
    keys, labels = [], []
    for name in found:
        images = _images_under(folder / name)
        if not images:
            raise SoupsError(f"class folder {folder / name} has no images ({', '.join(sorted(IMAGE_EXTS))})")
        keys += [str(p.relative_to(base)) for p in images]
        labels += [classes.index(name)] * len(images)
    return Samples(keys, np.asarray(labels, dtype=np.int64), list(keys), classes, base)


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative` as a listing wrote it, refusing a path that climbs out of `root` (`..`,
    an absolute path). Never resolved: keys are paths relative to `root` as the user gave it
    (relative, or reached through a link), and a link inside the dataset is its own to follow."""
    path = Path(os.path.normpath(relative))
    if path.is_absolute() or path.parts[:1] == ("..",):
        raise SoupsError(f"{what}: path {relative!r} points outside the dataset root {root}")
    return root / path


def unlabelled(root: Path, classes: list[str]) -> Samples:
    """Every image under `root`; labelled (by its first folder) only when every image sits in a
    folder named after one of `classes`."""
    paths = _images_under(root)
    if not paths:
        raise SoupsError(f"no images under {root} ({', '.join(sorted(IMAGE_EXTS))})")
    keys = [str(p.relative_to(root)) for p in paths]
    tops = [Path(k).parts[0] if len(Path(k).parts) > 1 else None for k in keys]
    labelled = all(t in classes for t in tops)
    labels = [classes.index(t) if labelled else -1 for t in tops]
    return Samples(keys, np.asarray(labels, np.int64), keys, list(classes), root)
