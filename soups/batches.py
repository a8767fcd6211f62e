"""The training batches of a fine-tune: the training split with its augmentation, oversampled
classes repeated, each process's share of every batch, and the random state a resumed run needs
to draw the very batches an uninterrupted one would have."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from soups import SoupsError, data
from soups.augment import pipeline
from soups.distributed import SINGLE, RankBatches, World, check_batch
from soups.evaluate import default_device

log = logging.getLogger(__name__)


def fits_in_memory(samples: data.Samples, size: int, cache_mb: int) -> bool:
    return len(samples) * size * size * 3 <= cache_mb * 2**20


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 HxWx3 tensor, label) pairs, from decoded images or decoding on the fly. Indexed by
    `j`, or by `(j, seed)` to augment image j from its own seed (see `SeededBatches`): that resets
    the shared pipeline's generators, so one dataset serves one thread (a loader worker holds its
    own copy)."""

    def __init__(self, source: data.Decoded | data.Samples, size: int, transform=None):
        self.source, self.size, self.transform = source, size, transform

    def __len__(self) -> int:
        return len(self.source.labels)

    def __getitem__(self, item):
        j, seed = item if isinstance(item, tuple) else (item, None)
        if isinstance(self.source, data.Decoded):
            img = self.source.pixels[j]
        else:
            img = data.resized(self.source.read(j), self.size)
        if self.transform is not None:
            if seed is not None:
                # One generator pair shared by the steps, drawn from in turn: albumentations'
                # `set_random_seed` gives every step its own generator from the same seed, so the
                # steps would all draw the same numbers and switch on and off together.
                self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
            img = self.transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.source.labels[j])


class Parts(torch.utils.data.Dataset):
    """Datasets one after another (ConcatDataset, passing a `(j, seed)` index through)."""

    def __init__(self, parts: list[ImageDataset]):
        self.parts, self.ends = parts, np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, item):
        j, seed = item
        k = int(np.searchsorted(self.ends, j, side="right"))
        return self.parts[k][(j - (int(self.ends[k - 1]) if k else 0), seed)]


class SeededBatches(torch.utils.data.Sampler):
    """Shuffled batches of `(image, seed)` pairs. Each epoch draws the order and one augmentation
    seed per position from `generator`, so an image's augmentation depends on where it falls in
    the epoch, never on which process or loader worker takes it: the ranks of a data-parallel run
    augment their shares of a batch exactly as one process augments the whole batch (and no two
    ranks draw in lockstep), and a loader worker needs no seed of its own."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.drop_last = n > batch_size  # a size-1 last batch breaks BatchNorm

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        seeds = torch.randint(2**31, (self.n,), generator=self.generator).tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = min(start + self.batch_size, self.n)
            yield list(zip(order[start:stop], seeds[start:stop], strict=True))

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else min(self.n, 1)


@dataclass(frozen=True)
class LoaderSettings:
    """What the training loader reads (the step makes it from the recipe: `recipe.loader_settings`)."""

    img_size: int
    batch_size: int
    seed: int  # draws the batches and every image's augmentation
    workers: int
    cache_mb: int  # decoded images stay in memory when they fit
    skip_bad: bool
    aug: str
    oversample: str  # classes repeated with their own augmentation ("" none)
    oversample_factor: int
    oversample_aug: str


class TrainLoader(torch.utils.data.DataLoader):
    """Shuffled batches of `batch_size` images (this process's share of them, with several), drawn
    from one generator seeded by `seed`: the same seed gives the same batches, augmented alike, with
    any number of processes or loader workers."""

    def __init__(self, dataset, batch_size: int, seed: int, world: World = SINGLE, workers: int = 0):
        share = check_batch(batch_size, world)
        if world.parallel and share < 2:
            raise SoupsError(f"batch_size={batch_size} leaves under 2 images per process")
        generator = torch.Generator().manual_seed(seed)
        batches = SeededBatches(len(dataset), batch_size, generator)
        super().__init__(
            dataset,
            batch_sampler=RankBatches(batches, world) if world.parallel else batches,
            num_workers=workers,
            generator=generator,
            persistent_workers=False,
        )

    def rng_state(self) -> dict:
        """What decides the next batches and their augmentation: the one generator."""
        return {"generator": self.generator.get_state()}

    def set_rng_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def oversampled_classes(spec: str, classes: list[str]) -> list[int]:
    """Class indices named by `oversample`: names or indices, comma-separated, or `old`."""
    picked = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item == "old":
            old = [j for j, c in enumerate(classes) if c.rsplit("/", 1)[-1].startswith(">=")]
            if not old:
                raise SoupsError("oversample=old needs the mask layout's age classes")
            picked += old
        elif item in classes:
            picked.append(classes.index(item))
        elif item.isdigit() and int(item) < len(classes):
            picked.append(int(item))
        else:
            raise SoupsError(f"oversample: {item!r} is not a class (classes: {', '.join(classes[:6])}, ...)")
    return sorted(set(picked))


def train_loader(
    splits: data.Splits, settings: LoaderSettings, world: World = SINGLE, device: torch.device | None = None
) -> tuple[TrainLoader, int]:
    """Batches of the training split with the `aug` augmentation, plus the `oversample`
    classes repeated with their own augmentation, drawn from the training split alone; decoded
    images stay in memory when they fit in `cache_mb`. Returns the loader and how many images
    were skipped as unreadable. With several processes, each loads its share of every batch.
    `device` is where the step runs (default: the GPU when there is one)."""
    size, skipped = settings.img_size, 0
    source: data.Decoded | data.Samples = splits.train
    if fits_in_memory(splits.train, size, settings.cache_mb):
        source = data.decode(splits.train, size, settings.workers, settings.skip_bad, "decode train")
        skipped = len(source.skipped)
    elif settings.skip_bad:  # decoded every epoch: leave the unreadable out before batches are drawn
        source, bad = data.readable(splits.train, settings.workers, "check train")
        skipped = len(bad)
    transform = pipeline(settings.aug, size)
    parts = [ImageDataset(source, size, transform)]
    if settings.oversample and settings.oversample_factor > 1:
        targets = oversampled_classes(settings.oversample, splits.train.classes)
        rows = np.flatnonzero(np.isin(source.labels, targets))
        extra = ImageDataset(source.subset(rows), size, pipeline(settings.oversample_aug, size))
        parts += [extra] * (settings.oversample_factor - 1)

    dataset = Parts(parts)
    # On a CPU, loader processes take their cores from the training step itself: with the images
    # decoded in memory, augmenting a batch here costs a few milliseconds (the demo on 2 cores:
    # 420 img/s with 2 workers, 600 without). Workers pay where they overlap with the step:
    # decoding files every epoch, or a GPU doing the step.
    decoding = isinstance(source, data.Samples)
    on_gpu = (device or default_device()).type == "cuda"
    workers = settings.workers if decoding or on_gpu else 0
    if workers != settings.workers:
        log.info(
            "workers=%d: training images are in memory and the CPU does the step; augmenting here",
            settings.workers,
        )
    return TrainLoader(dataset, settings.batch_size, settings.seed, world, workers), skipped
