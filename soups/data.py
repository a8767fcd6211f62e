"""The deterministic held-out split and its fingerprint, and images decoded once.

A layout (`soups.layouts`) turns a folder into `Samples` (keys, labels, groups); `make_splits`
cuts them into train / val / test as a pure function of the data and `split_seed`, never splitting
a group.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from soups import SoupsError
from soups.samples import Samples, data_root  # noqa: F401  (data.Samples, data.data_root: the library's names)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    train: Samples
    val: Samples
    test: Samples
    fingerprint: str  # of the held-out file lists: ingredients of one soup must share it
    relabelled: tuple = ()  # (key, old label, new label) of every corrected image


# ---------------------------------------------------------------------------------------------
# Splits


def capped(samples: Samples, n: int, seed: int) -> Samples:
    """At most `n` of `samples` (0: all), drawn with `seed`, in their order."""
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


def _refuse_shared(parts: dict[str, Samples], where: str) -> None:
    """A file or a group (one person) in two parts leaks: a model would be scored on what it
    trained or was chosen on. Cut parts never share a group; parts a layout supplies (its val /
    test lists, or one file listed twice) can, so every split is checked here, for every layout."""
    for (a, one), (b, other) in itertools.combinations(parts.items(), 2):
        for what, mine, theirs in (("file", one.keys, other.keys), ("group", one.groups, other.groups)):
            if shared := sorted(set(mine) & set(theirs)):
                raise SoupsError(
                    f"{where}: {a} and {b} share {len(shared)} {what}{'s' * (len(shared) > 1)}, e.g. "
                    f"{shared[0]!r}: put each {what} in one part only"
                )


def make_splits(
    parts: dict[str, Samples | None],
    val_ratio: float,
    test_ratio: float,
    split_seed: int,
    max_train: int = 0,
    max_val: int = 0,
    max_test: int = 0,
) -> Splits:
    """Cut missing val / test splits from the pool by group; refuse parts that share a file or a
    group; cap sizes; all a pure function of the inputs. The pool's groups are shuffled with
    `split_seed`, never its images, so a group's images always land together."""
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
    _refuse_shared(
        {"train": train, "val": val, "test": test}, f"{parts.get('layout', 'a')} layout at {pool.root}"
    )
    if not len(train) or not len(val):
        raise SoupsError(
            f"{pool.root}: {len(groups)} groups leave {len(train)} training and {len(val)} validation "
            "images; add data or change val_ratio / test_ratio"
        )
    train = capped(train, max_train, split_seed)
    val = capped(val, max_val, split_seed + 1)
    test = capped(test, max_test, split_seed + 2)
    return Splits(train, val, test, fingerprint(val, test), tuple(parts.get("relabelled", ())))


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


def readable(samples: Samples, workers: int = 2, desc: str = "check") -> tuple[Samples, list[str]]:
    """`samples` without the images that do not decode, and their keys: what `decode(skip_bad=True)`
    leaves out, for images too many to keep decoded (each is decoded once here and dropped)."""

    def ok(j: int) -> bool:
        try:
            samples.read(j)
            return True
        except SoupsError:
            return False

    with ThreadPoolExecutor(max(1, workers)) as pool:
        good = list(
            tqdm(pool.map(ok, range(len(samples))), total=len(samples), desc=desc, unit="img", leave=False)
        )
    bad = [samples.keys[j] for j, g in enumerate(good) if not g]
    return (samples.subset(np.flatnonzero(good)) if bad else samples), bad


def model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NxHxWx3 -> normalised float Nx3xHxW, the same for training, evaluation and inference."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)
