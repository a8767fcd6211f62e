"""Input pipeline: images/s the training loader delivers (mask-layout JPEGs 384x512 -> the
recipe's training size, `medium` augmentation, the recipe's worker count), decoding every epoch
vs from the decoded-image cache (epoch 2+), the two alternated over several epochs (medians),
against images/s the recipe's model consumes in training steps on this machine. Says which side
bounds an epoch."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import command, mask_dataset, report
from soups.batches import train_loader
from soups.data import model_input
from soups.losses import CrossEntropy
from soups.models import create_model, normalisation
from soups.recipe import load_recipe, load_splits, loader_settings


def loader_rate(loader, limit: int) -> float:
    seen, start = 0, time.perf_counter()
    for x, _ in loader:
        seen += len(x)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def loader_medians(decoding, cached, n: int, repeats: int) -> tuple[float, float]:
    """Median images/s of an epoch decoding and of one from the cache, `repeats` epochs each."""
    rates = {"decoding": [], "cached": []}
    for r in range(repeats):  # alternate the sides: the machine's load drifts
        for side in ("decoding", "cached") if r % 2 == 0 else ("cached", "decoding"):
            rates[side].append(loader_rate(decoding if side == "decoding" else cached, n))
    uncached_rate, cached_rate = (statistics.median(rates[k]) for k in ("decoding", "cached"))
    return uncached_rate, cached_rate


def training_rate(recipe, classes: int, loader, steps: int) -> float:
    """Images/s the recipe's model consumes in `steps` training steps fed by `loader`."""
    model = create_model(recipe.model, classes).train()
    mean, std = normalisation(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = CrossEntropy(0.1)
    batches = iter(loader)
    x, y = next(batches)
    loss_fn(model, model_input(x, mean, std), y).backward()  # warm-up step, not timed
    seen, start = 0, time.perf_counter()
    for _ in range(steps):
        x, y = next(batches, None) or next(iter(loader))
        opt.zero_grad()
        loss_fn(model, model_input(x, mean, std), y).backward()
        opt.step()
        seen += len(x)
    return seen / (time.perf_counter() - start)


def rows(recipe, n: int, decode_s: float, repeats: int, uncached_rate, cached_rate, model_rate, bound):
    """The report rows: the loader against the model, and the cache against decoding."""
    size = f"{recipe.model} at {recipe.img_size}px, batch {recipe.batch_size}, {recipe.workers} workers"
    return [
        {
            "what": f"an epoch decoding {n} JPEGs 384x512: loader vs model ({size})",
            "a": f"loader {uncached_rate:.0f} img/s",
            "b": f"model {model_rate:.1f} img/s",
            "ratio": f"loader {uncached_rate / model_rate:.1f}x the model",
            "target": f"an epoch is bound by {bound}",
            "ok": None,
        },
        {
            "what": "an epoch from the decoded-image cache (decoded once in "
            f"{decode_s:.1f} s, {n * recipe.img_size**2 * 3 / 2**20:.0f} MiB) vs decoding, "
            f"alternated, median of {repeats} epochs each",
            "a": f"loader decoding {uncached_rate:.0f} img/s",
            "b": f"loader from cache {cached_rate:.0f} img/s",
            "ratio": f"{cached_rate / uncached_rate:.1f}x faster",
            "target": "cache >= decoding",
            "ok": cached_rate >= uncached_rate,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="configs/mask.yaml")
    parser.add_argument("--persons", type=int, default=60)
    parser.add_argument("--steps", type=int, default=4, help="training steps to time the model")
    parser.add_argument("--repeats", type=int, default=4, help="epochs per loader side, alternated")
    args = parser.parse_args()
    root = mask_dataset(Path(tempfile.gettempdir()) / "soups-bench" / f"mask{args.persons}", args.persons)
    base = {"data": str(root), "pretrained": "none", "aug": "medium", "val_ratio": 0.1, "test_ratio": 0.1}
    lazy = load_recipe(args.recipe, {**base, "cache_mb": 0})
    cached = load_recipe(args.recipe, base)
    splits = load_splits(lazy)
    n = len(splits.train)
    decoding = train_loader(splits, loader_settings(lazy))[0]
    start = time.perf_counter()
    loader, _ = train_loader(splits, loader_settings(cached))  # decodes the split once, into memory
    decode_s = time.perf_counter() - start
    uncached_rate, cached_rate = loader_medians(decoding, loader, n, args.repeats)
    model_rate = training_rate(cached, len(splits.train.classes), loader, args.steps)
    slowest = min(uncached_rate, model_rate)
    bound = "the model" if model_rate <= uncached_rate else "the loader"
    measured = rows(cached, n, decode_s, args.repeats, uncached_rate, cached_rate, model_rate, bound)
    report("input_pipeline", measured, command())
    print(f"slowest stage {slowest:.1f} img/s: {bound} bounds an epoch")


if __name__ == "__main__":
    main()
