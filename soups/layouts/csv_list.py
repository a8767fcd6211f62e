"""`<root>/labels.csv` with columns `path,label` (paths relative to the root; the label a class
name), and optionally `group` (images of one group never straddle train and val/test) and
`split` (train, val or test: fixed parts, the rest is cut from train)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from soups import SoupsError
from soups.layouts.files import IMAGE_EXTS, inside
from soups.layouts.registry import Layout, register
from soups.samples import Samples

FILE = "labels.csv"
SPLITS = ("train", "val", "test")


def read(root: Path) -> dict[str, Samples | None]:
    listing = root / FILE
    if not listing.is_file():
        raise SoupsError(f"{listing} not found (csv layout: <root>/{FILE} with columns path,label)")
    with listing.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SoupsError(f"{listing} lists no images")
    if not {"path", "label"} <= set(rows[0]):
        raise SoupsError(f"{listing} needs columns path,label (has {', '.join(rows[0])})")
    classes = sorted({r["label"].strip() for r in rows})
    parts: dict[str, list] = {s: [] for s in SPLITS}
    for n, r in enumerate(rows, start=2):  # line numbers as an editor shows them
        path = inside(root, r["path"].strip(), f"{listing} line {n}")
        if path.suffix.lower() not in IMAGE_EXTS:
            raise SoupsError(
                f"{listing} line {n}: {r['path']!r} is not an image ({', '.join(sorted(IMAGE_EXTS))})"
            )
        split = (r.get("split") or "train").strip()
        if split not in SPLITS:
            raise SoupsError(f"{listing} line {n}: split {split!r} must be one of {', '.join(SPLITS)}")
        key = path.relative_to(root).as_posix()
        parts[split].append((key, classes.index(r["label"].strip()), (r.get("group") or key).strip()))

    def samples(items) -> Samples | None:
        if not items:
            return None
        keys, labels, groups = zip(*items, strict=True)
        return Samples(list(keys), np.asarray(labels, np.int64), list(groups), classes, root)

    if not parts["train"]:
        raise SoupsError(f"{listing} has no training images (rows with split train or no split)")
    return {"pool": samples(parts["train"]), "val": samples(parts["val"]), "test": samples(parts["test"])}


register(Layout("csv", f"<root>/{FILE} with columns path,label[,group][,split]", read))
