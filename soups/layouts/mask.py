"""The mask / gender / age competition: `train/images/<id>_<gender>_<race>_<age>/{mask1..5,
incorrect_mask,normal}.<ext>`, one person one group, 18 classes (mask x gender x age bin). Its
own extras: label corrections by person id (`relabel`), the age boundaries (`age_bins`), scores
per attribute, a per-attribute vote, and the competition's submission (`eval/info.csv` order,
columns ImageID,ans)."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from soups import SoupsError
from soups.layouts.files import IMAGE_EXTS, inside
from soups.layouts.registry import Attributes, Layout, register
from soups.samples import Samples

log = logging.getLogger(__name__)

FILES = {f"mask{k}": 0 for k in range(1, 6)} | {"incorrect_mask": 1, "normal": 2}
FOLDER = re.compile(r"^(?P<id>\d+(?:-\d+)?)_(?P<gender>male|female)_(?P<race>[A-Za-z]+)_(?P<age>\d+)$")
MASK_NAMES = ("wear", "incorrect", "not wear")
GENDER_NAMES = ("male", "female")
AGE_BOUNDS = (30, 60)
ATTRIBUTES = ("mask", "gender", "age")
RELABEL_ACTIONS = {
    "swap_incorrect_normal": "the person's incorrect_mask and normal photos trade labels",
    "incorrect_to_mask": "the person's incorrect_mask photo is a worn mask",
    "flip_gender": "the person's gender is the other one",
}


def age_bin(age: int, bounds: tuple[int, int] = AGE_BOUNDS) -> int:
    return int(age >= bounds[0]) + int(age >= bounds[1])


def mask_label(mask: int, gender: int, age: int) -> int:
    """The competition's 18 classes: mask (0 worn, 1 incorrect, 2 not worn) * 6 + gender * 3 + age bin."""
    return mask * 6 + gender * 3 + age


def mask_attributes(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The 18 classes split back into their attributes."""
    labels = np.asarray(labels)
    return {"mask": labels // 6, "gender": (labels // 3) % 2, "age": labels % 3}


def mask_classes(bounds: tuple[int, int] = AGE_BOUNDS) -> list[str]:
    ages = (f"<{bounds[0]}", f"{bounds[0]}-{bounds[1] - 1}", f">={bounds[1]}")
    return [f"{m}/{g}/{a}" for m in MASK_NAMES for g in GENDER_NAMES for a in ages]


def read_relabel(path: str | Path) -> dict[str, set[str]]:
    """Label corrections by person id: a YAML mapping `action: [ids]`, or a CSV with columns
    `id,action`. Ids are strings ("001498-1"); bare YAML numbers are read as 6-digit ids."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SoupsError(f"relabel file {path} not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"id", "action"} <= set(rows[0]):
            raise SoupsError(f"relabel file {path} needs columns id, action")
        pairs = [(r["action"].strip(), r["id"].strip()) for r in rows]
    else:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise SoupsError(f"relabel file {path} must map actions to lists of person ids")
        pairs = [
            (a, f"{i:06d}" if isinstance(i, int) else str(i)) for a, ids in raw.items() for i in ids or []
        ]
    out: dict[str, set[str]] = {a: set() for a in RELABEL_ACTIONS}
    for action, pid in pairs:
        if action not in RELABEL_ACTIONS:
            raise SoupsError(
                f"relabel file {path}: unknown action {action!r} (use {', '.join(RELABEL_ACTIONS)})"
            )
        out[action].add(pid)
    return out


def parse_age_bins(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in str(text).split(","))
    except ValueError:
        raise SoupsError(f"age_bins={text!r} must be two ages, e.g. 30,60") from None
    if not 0 < low < high:
        raise SoupsError(f"age_bins={text!r} must be increasing positive ages")
    return low, high


def read(root: Path, age_bins: str = "30,60", relabel: str = "") -> dict[str, Samples | None]:
    """With `train/train.csv` (column `path`), only the folders it lists are read. `relabel`
    corrections apply at load time; part "relabelled" lists (key, old, new) labels."""
    bounds = parse_age_bins(age_bins)
    fixes = read_relabel(relabel) if relabel else {a: set() for a in RELABEL_ACTIONS}
    images = root / "train" / "images"
    if not images.is_dir():
        raise SoupsError(f"{images} not found (mask layout: <root>/train/images/<id>_<gender>_<race>_<age>/)")
    listing = root / "train" / "train.csv"
    if listing.is_file():
        with listing.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "path" not in rows[0]:
            raise SoupsError(f"{listing} has no `path` column")
        folders = [inside(images, r["path"], str(listing)) for r in rows]
    else:
        folders = sorted(d for d in images.iterdir() if d.is_dir() and not d.name.startswith("."))
    keys, labels, groups, changed = [], [], [], []
    for folder in folders:
        m = FOLDER.match(folder.name)
        if not m:
            raise SoupsError(f"mask folder {folder} does not parse as <id>_<male|female>_<race>_<age>")
        pid = m["id"]
        gender, age = GENDER_NAMES.index(m["gender"]), age_bin(int(m["age"]), bounds)
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
        for p in files:
            if p.stem not in FILES or p.suffix.lower() not in IMAGE_EXTS:
                raise SoupsError(f"unexpected file {p} (expected {', '.join(FILES)} images)")
            worn, sex = FILES[p.stem], gender
            original = mask_label(worn, sex, age)
            if pid in fixes["swap_incorrect_normal"] and worn in (1, 2):
                worn = 3 - worn
            if pid in fixes["incorrect_to_mask"] and FILES[p.stem] == 1:
                worn = 0
            if pid in fixes["flip_gender"]:
                sex = 1 - sex
            label = mask_label(worn, sex, age)
            keys.append(str(p.relative_to(root)))
            labels.append(label)
            groups.append(pid)
            if label != original:
                changed.append((keys[-1], original, label))
    if not keys:
        raise SoupsError(f"no images under {images}")
    unknown = set().union(*fixes.values()) - set(groups)
    if unknown:
        log.warning("relabel: %d person id(s) not in the data, e.g. %s", len(unknown), sorted(unknown)[:3])
    pool = Samples(keys, np.asarray(labels, dtype=np.int64), groups, mask_classes(bounds), root)
    return {"pool": pool, "val": None, "test": None, "relabelled": changed}


def mask_eval(root: Path) -> Samples:
    """The competition's unlabelled test images: `eval/info.csv` (ImageID, ans) in its row order,
    the images in `eval/images/`."""
    info = root / "eval" / "info.csv"
    if not info.is_file():
        raise SoupsError(f"{info} not found (mask layout: <root>/eval/info.csv with columns ImageID, ans)")
    with info.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "ImageID" not in rows[0]:
        raise SoupsError(f"{info} has no ImageID column")
    images = root / "eval" / "images"
    keys = [str(inside(images, r["ImageID"], str(info)).relative_to(root)) for r in rows]
    return Samples(keys, np.full(len(keys), -1, np.int64), keys, mask_classes(), root)


def submission(samples: Samples, column: list[int]) -> pd.DataFrame:
    """The competition's format: ImageID,ans in info.csv order."""
    ids = [Path(k).relative_to("eval/images").as_posix() for k in samples.keys]
    return pd.DataFrame({"ImageID": ids, "ans": column})


register(
    Layout(
        "mask",
        "train/images/<id>_<gender>_<race>_<age>/{mask1..5,incorrect_mask,normal}.*, eval/info.csv",
        read,
        inputs=lambda root, classes: mask_eval(root),
        attributes=Attributes(ATTRIBUTES, mask_attributes, mask_label),
        submission=submission,
    )
)
