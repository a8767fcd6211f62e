"""Dataset layouts, the deterministic held-out split and its fingerprint, decoding and loaders.

A layout turns a folder into `Samples` (keys, labels, groups); `make_splits` cuts them into
train / val / test as a pure function of the data and `split_seed`, never splitting a group.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import re
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from soups import SoupsError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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


@dataclass(frozen=True)
class Splits:
    train: Samples
    val: Samples
    test: Samples
    fingerprint: str  # of the held-out file lists: ingredients of one soup must share it
    relabelled: tuple = ()  # (key, old label, new label) of every corrected image


# ---------------------------------------------------------------------------------------------
# Layouts: root -> {"pool": Samples, "val": Samples | None, "test": Samples | None}

FASHION_MNIST_CLASSES = [
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
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path) -> np.ndarray:
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


def fashion_mnist(root: Path) -> dict[str, Samples | None]:
    missing = [n for pair in FASHION_MNIST_FILES.values() for n in pair if not (root / n).is_file()]
    if missing:
        raise SoupsError(
            f"Fashion-MNIST files missing in {root}: {', '.join(missing)} "
            "(`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)"
        )
    out: dict[str, Samples | None] = {"val": None}
    for part, (images, labels) in FASHION_MNIST_FILES.items():
        pixels, y = _read_idx(root / images), _read_idx(root / labels)
        if len(pixels) != len(y):
            raise SoupsError(f"{root / images} has {len(pixels)} images but {labels} {len(y)} labels")
        keys = [f"{images}:{r}" for r in range(len(y))]
        out["pool" if part == "train" else "test"] = Samples(
            keys, y.astype(np.int64), keys, FASHION_MNIST_CLASSES, root, pixels, np.arange(len(y))
        )
    return out


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTS and not any(s.startswith(".") for s in p.parts) and p.is_file()
    )


def _class_folders(folder: Path, base: Path, classes: list[str] | None = None) -> Samples:
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


def imagefolder(root: Path) -> dict[str, Samples | None]:
    """`<root>/<class>/…`, or `<root>/train/<class>/…` with optional `val/` and `test/` beside it
    (given splits are used as they are; missing ones are cut from train)."""
    if not (root / "train").is_dir():
        return {"pool": _class_folders(root, root), "val": None, "test": None}
    pool = _class_folders(root / "train", root)
    given = {
        p: _class_folders(root / p, root, pool.classes) if (root / p).is_dir() else None
        for p in ("val", "test")
    }
    return {"pool": pool, **given}


MASK_FILES = {f"mask{k}": 0 for k in range(1, 6)} | {"incorrect_mask": 1, "normal": 2}
MASK_FOLDER = re.compile(r"^(?P<id>\d+(?:-\d+)?)_(?P<gender>male|female)_(?P<race>[A-Za-z]+)_(?P<age>\d+)$")
MASK_NAMES = ("wear", "incorrect", "not wear")
GENDER_NAMES = ("male", "female")
AGE_BOUNDS = (30, 60)


def age_bin(age: int, bounds: tuple[int, int] = AGE_BOUNDS) -> int:
    return int(age >= bounds[0]) + int(age >= bounds[1])


def mask_label(mask: int, gender: int, age: int) -> int:
    """The competition's 18 classes: mask (0 worn, 1 incorrect, 2 not worn) * 6 + gender * 3 + age bin."""
    return mask * 6 + gender * 3 + age


def mask_classes(bounds: tuple[int, int] = AGE_BOUNDS) -> list[str]:
    ages = (f"<{bounds[0]}", f"{bounds[0]}-{bounds[1] - 1}", f">={bounds[1]}")
    return [f"{m}/{g}/{a}" for m in MASK_NAMES for g in GENDER_NAMES for a in ages]


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, refusing paths that escape `root` (`..`, absolute paths, symlinks out)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise SoupsError(f"{what}: path {relative!r} points outside the dataset root {root}")
    return path


RELABEL_ACTIONS = {
    "swap_incorrect_normal": "the person's incorrect_mask and normal photos trade labels",
    "incorrect_to_mask": "the person's incorrect_mask photo is a worn mask",
    "flip_gender": "the person's gender is the other one",
}


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


def mask(root: Path, age_bins: str = "30,60", relabel: str = "") -> dict[str, Samples | None]:
    """`train/images/<id>_<gender>_<race>_<age>/{mask1..5,incorrect_mask,normal}.<ext>`; one person
    is one group. With `train/train.csv` (column `path`), only the folders it lists are read.
    `relabel` corrections apply at load time; part "relabelled" lists (key, old, new) labels."""
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
        m = MASK_FOLDER.match(folder.name)
        if not m:
            raise SoupsError(f"mask folder {folder} does not parse as <id>_<male|female>_<race>_<age>")
        pid = m["id"]
        gender, age = GENDER_NAMES.index(m["gender"]), age_bin(int(m["age"]), bounds)
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
        for p in files:
            if p.stem not in MASK_FILES or p.suffix.lower() not in IMAGE_EXTS:
                raise SoupsError(f"unexpected file {p} (expected {', '.join(MASK_FILES)} images)")
            worn, sex = MASK_FILES[p.stem], gender
            original = mask_label(worn, sex, age)
            if pid in fixes["swap_incorrect_normal"] and worn in (1, 2):
                worn = 3 - worn
            if pid in fixes["incorrect_to_mask"] and MASK_FILES[p.stem] == 1:
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


LAYOUT_READERS = {"fashion-mnist": fashion_mnist, "imagefolder": imagefolder, "mask": mask}


def data_root(data: str | Path) -> Path:
    root = Path(data).expanduser()
    if not str(data) or not root.is_dir():
        raise SoupsError(f"data folder {str(data)!r} not found (set `data` to the dataset root)")
    return root


def read_layout(layout: str, data: str | Path, **mask_options) -> dict:
    """Read a dataset. `mask_options` (age_bins, relabel) belong to the mask layout alone."""
    if layout not in LAYOUT_READERS:
        raise SoupsError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUT_READERS)}")
    if layout != "mask" and mask_options.get("relabel"):
        raise SoupsError(f"relabel applies to the mask layout, not {layout}")
    options = {k: v for k, v in mask_options.items() if v} if layout == "mask" else {}
    return LAYOUT_READERS[layout](data_root(data), **options)


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
    keys = [str(inside(images, r["ImageID"], str(info)).relative_to(root.resolve())) for r in rows]
    return Samples(keys, np.full(len(keys), -1, np.int64), keys, mask_classes(), root.resolve())


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


def inference_inputs(recipe, classes: list[str]) -> Samples:
    """What `infer` predicts: the mask layout's eval images, Fashion-MNIST's test split (as the
    recipe caps it), or every image under an image folder."""
    if recipe.layout == "fashion-mnist":
        return load_splits(recipe).test
    root = data_root(recipe.data)
    return mask_eval(root) if recipe.layout == "mask" else unlabelled(root, classes)


# ---------------------------------------------------------------------------------------------
# Splits


def _cap(samples: Samples, n: int, seed: int) -> Samples:
    if not n or len(samples) <= n:
        return samples
    return samples.subset(np.sort(np.random.default_rng(seed).choice(len(samples), n, replace=False)))


def digest(samples: Samples) -> str:
    """Of one part's images and labels: changes exactly when they do (an MLflow dataset digest)."""
    lines = sorted(f"{k}\t{y}" for k, y in zip(samples.keys, samples.labels.tolist(), strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def data_name(data: str | Path) -> str:
    """A short name for a dataset: its folder's name (`/usr/share/datasets/fashion-mnist` ->
    `fashion-mnist`), lower case, with anything but letters, digits, - and _ made a -."""
    name = Path(str(data).rstrip("/")).name or "data"
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "data"


def fingerprint(val: Samples, test: Samples) -> str:
    """What makes two runs' held-out scores comparable: the class names and every val and test
    image with its label (a relabel list or other age bins change it, so their runs never share a
    soup or a champion comparison)."""
    h = hashlib.sha256()
    for name, part in (
        ("classes", list(val.classes)),
        ("val", sorted(f"{k}\t{y}" for k, y in zip(val.keys, val.labels.tolist(), strict=True))),
        ("test", sorted(f"{k}\t{y}" for k, y in zip(test.keys, test.labels.tolist(), strict=True))),
    ):
        h.update(("\n".join([name, *part]) + "\n").encode())
    return h.hexdigest()[:16]


def make_splits(
    parts: dict[str, Samples | None],
    val_ratio: float,
    test_ratio: float,
    split_seed: int,
    max_train: int = 0,
    max_val: int = 0,
    max_test: int = 0,
) -> Splits:
    """Cut missing val / test splits from the pool by group; cap sizes; all a pure function of the
    inputs. The pool's groups are shuffled with `split_seed`, never its images, so a group's
    images always land together."""
    for name, ratio in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not 0 <= ratio < 1:
            raise SoupsError(f"{name}={ratio} must be in [0, 1)")
    pool = parts["pool"]
    groups = sorted(set(pool.groups))
    order = [groups[k] for k in np.random.default_rng(split_seed).permutation(len(groups))]
    n_test = 0 if parts["test"] is not None else max(int(round(test_ratio * len(groups))), test_ratio > 0)
    n_val = 0 if parts["val"] is not None else max(int(round(val_ratio * len(groups))), val_ratio > 0)
    where = {g: "test" for g in order[:n_test]} | {g: "val" for g in order[n_test : n_test + n_val]}
    cut = {
        name: pool.subset([j for j, g in enumerate(pool.groups) if where.get(g, "train") == name])
        for name in ("train", "val", "test")
    }
    train = cut["train"]
    val = parts["val"] if parts["val"] is not None else cut["val"]
    test = parts["test"] if parts["test"] is not None else cut["test"]
    if not len(train) or not len(val):
        raise SoupsError(
            f"{pool.root}: {len(groups)} groups leave {len(train)} training and {len(val)} validation "
            "images; add data or change val_ratio / test_ratio"
        )
    train = _cap(train, max_train, split_seed)
    val = _cap(val, max_val, split_seed + 1)
    test = _cap(test, max_test, split_seed + 2)
    return Splits(train, val, test, fingerprint(val, test), tuple(parts.get("relabelled", ())))


def load_splits(recipe) -> Splits:
    parts = read_layout(recipe.layout, recipe.data, age_bins=recipe.age_bins, relabel=recipe.relabel)
    return make_splits(
        parts,
        recipe.val_ratio,
        recipe.test_ratio,
        recipe.split_seed,
        recipe.max_train,
        recipe.max_val,
        recipe.max_test,
    )


# ---------------------------------------------------------------------------------------------
# Decoding, caching and loading


def resized(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` and crop the centre square: HxWx3 uint8."""
    return np.array(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class Decoded:
    """Images decoded and resized once, kept in memory: later epochs and every model scored on
    them skip decoding."""

    pixels: np.ndarray  # N x S x S x 3 uint8
    labels: np.ndarray
    keys: list[str]
    skipped: list[str]  # keys of unreadable images left out (skip_bad)

    def subset(self, idx) -> Decoded:
        idx = np.asarray(idx, dtype=np.int64)
        return Decoded(self.pixels[idx], self.labels[idx], [self.keys[j] for j in idx], [])


def decode(
    samples: Samples, size: int, workers: int = 2, skip_bad: bool = False, desc: str = "decode"
) -> Decoded:
    """Decode every image of `samples` at `size` (threads: PIL releases the GIL while decoding)."""

    def one(j: int) -> np.ndarray | None:
        try:
            return resized(samples.read(j), size)
        except SoupsError:
            if skip_bad:
                return None
            raise

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(
            tqdm(
                pool.map(one, range(len(samples))),
                total=len(samples),
                desc=desc,
                unit="img",
                leave=False,
                mininterval=1.0,
            )
        )
    kept = [j for j, im in enumerate(images) if im is not None]
    pixels = np.stack([images[j] for j in kept]) if kept else np.zeros((0, size, size, 3), np.uint8)
    return Decoded(
        pixels,
        samples.labels[kept],
        [samples.keys[j] for j in kept],
        [samples.keys[j] for j, im in enumerate(images) if im is None],
    )


def fits_in_memory(samples: Samples, size: int, cache_mb: int) -> bool:
    return len(samples) * size * size * 3 <= cache_mb * 2**20


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 HxWx3 tensor, label) pairs, from decoded images or decoding on the fly."""

    def __init__(self, source: Decoded | Samples, size: int, transform=None):
        self.source, self.size, self.transform = source, size, transform

    def __len__(self) -> int:
        return len(self.source.labels)

    def __getitem__(self, j: int):
        if isinstance(self.source, Decoded):
            img = self.source.pixels[j]
        else:
            img = resized(self.source.read(j), self.size)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.source.labels[j])


def model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NxHxWx3 -> normalised float Nx3xHxW, the same for training, evaluation and inference."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


MASK_ATTRIBUTES = ("mask", "gender", "age")


def mask_attributes(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The competition label split back into its three attributes."""
    labels = np.asarray(labels)
    return {"mask": labels // 6, "gender": (labels // 3) % 2, "age": labels % 3}
