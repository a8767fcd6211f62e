"""The ingredients of a soup: which ranked runs can join it (same model, split and start), their
checkpoints loaded one at a time through the cache, the start they share, and the held-out
images every candidate is scored on."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from soups import SoupsError, data, tracking
from soups.evaluate import EvalSet
from soups.models import Checkpoint, create_model, load_checkpoint, weights_digest
from soups.recipe import Recipe
from soups.soup import Candidate, StateDict


@dataclass
class Gathered:
    """The ranked candidate runs of a soup step, the top one on the recipe's split, that split."""

    runs: list
    top: object
    ref: Recipe  # the top run's recipe, rebuilt from its params
    splits: data.Splits
    filter: str


def incompatible(run, top) -> str | None:
    """Why `run` cannot join a soup started from the top-ranked run, judged from what it logged."""
    for key, read in (("model", tracking.model_of), ("num_classes", tracking.classes_of)):
        if read(run) != read(top):
            return f"incompatible: {key} {read(run)} differs from the top run's {read(top)}"
    split, top_split = tracking.split_of(run), tracking.split_of(top)
    if split != top_split:
        return f"another split: {split}, the recipe's is {top_split} (other data options or split_seed)"
    start, top_start = tracking.start_of(run), tracking.start_of(top)
    if start is None:
        return f"no {tracking.START} tag: its starting weights are unknown; fine-tune it again to use it"
    if start != top_start:
        return (
            f"incompatible: started from weights {start[:12]}… ({start_name(run)}), the top run from "
            f"{(top_start or '?')[:12]}… ({start_name(top)}): averaging fine-tunes of different starts "
            "lands between basins"
        )
    return None


def start_name(run) -> str:
    start_run = tracking.start_run_of(run)
    return f"start run {start_run}" if start_run else f"pretrained={tracking.pretrained_of(run)}"


class Ingredients:
    """Loads ranked runs' checkpoints lazily, one at a time, through the on-disk cache."""

    def __init__(self, runs: list, top):
        self.runs, self.top, self.downloaded = runs, top, 0
        self.meta: Checkpoint | None = None

    def load(self, run) -> dict:
        if reason := incompatible(run, self.top):
            raise SoupsError(reason)
        path, fresh = tracking.cached_checkpoint(run)
        self.downloaded += fresh
        ckpt = load_checkpoint(path)
        if ckpt.model != tracking.model_of(self.top) or ckpt.split != tracking.split_of(self.top):
            raise SoupsError(f"checkpoint of run {run.info.run_id} disagrees with its run's params and tags")
        if self.meta is None:
            self.meta = Checkpoint(
                {}, ckpt.model, ckpt.num_classes, ckpt.classes, ckpt.img_size, ckpt.split, ckpt.mean, ckpt.std
            )
        return ckpt.state_dict

    def candidates(self):
        return (Candidate(r.info.run_id, partial(self.load, r)) for r in self.runs)


def start_weights(top, ref: Recipe, num_classes: int) -> StateDict:
    """The exact weights the ingredients started from, checked against their `soups.start` tag: the
    start run's checkpoint, or the pretrained weights rebuilt as `finetune` built them."""
    expected, start_run = tracking.start_of(top), tracking.start_run_of(top)
    if start_run:
        try:
            state = load_checkpoint(tracking.cached_checkpoint(tracking.get_run(start_run))[0]).state_dict
        except SoupsError as e:
            raise SoupsError(f"start run {start_run} of the ingredients: {e}") from None
        where = f"start run {start_run}"
    else:
        pretrained = ref.pretrained
        if tracking.is_mlflow_uri(pretrained):
            pretrained = str(tracking.checkpoint_for(pretrained))
        state = create_model(ref.model, num_classes, pretrained).state_dict()
        where = f"pretrained={ref.pretrained} rebuilt here"
    if weights_digest(state) != expected:
        raise SoupsError(
            f"the start weights ({where}) have digest {weights_digest(state)[:12]}…, the ingredients "
            f"started from {(expected or '?')[:12]}…: the start is not available as it was"
        )
    return state


def held_out_sets(splits: data.Splits, recipe: Recipe, num_classes: int, bn_images: int | None):
    """val and test decoded once, and `bn_images` training images (0: all; None: none) to
    recompute BatchNorm statistics of averaged weights."""
    # skip_bad as the ingredients had it: their val_accuracy left the same unreadable images out.
    decode = partial(data.decode, size=recipe.img_size, workers=recipe.workers, skip_bad=recipe.skip_bad)
    val = EvalSet.from_decoded(decode(splits.val, desc="decode val"), num_classes)
    test = (
        EvalSet.from_decoded(decode(splits.test, desc="decode test"), num_classes)
        if len(splits.test)
        else None
    )
    bn = None
    if bn_images is not None:
        train = splits.train.subset(recalibration_order(len(splits.train), bn_images))
        bn = EvalSet.from_decoded(decode(train, desc="decode train (BatchNorm)"), num_classes)
    return val, test, bn


def recalibration_order(n: int, images: int, seed: int = 0) -> np.ndarray:
    """Which training images recompute BatchNorm statistics, and in what order: `images` of the `n`
    (0: all) in a seeded shuffled order. Layouts list files class by class, and torch's update_bn
    averages per-batch variances: batches of one or two classes leave out the spread between
    classes (measured on the demo's soup: 87.57 test in class order, 88.83 shuffled)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:images] if images else order
