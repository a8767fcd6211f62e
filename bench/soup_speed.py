"""Greedy soup speed on real fine-tuned ingredients with true labels and the soup step's defaults
(BatchNorm recalibrated on 1,000 training images for every averaged candidate): the demo recipe's
shared-start sweep (the members bench/soup_quality.py trains and caches; trained here when the
cache lacks them), its val split and 1,000 training images written as JPEG files, as an image
folder holds them. Three ways to cook the same soup, which must pick the same ingredients:

- seed-style: for every candidate, reload every checkpoint of the soup from disk and average them
  all in memory, decode and resize every JPEG again (val and the BatchNorm images) through a loader;
- decode once: soups' Scorer over images decoded once, every candidate scored in full;
- soups: the same plus exact early rejection (a candidate stops being scored once it cannot win).

The first two differ by what decoding once (and streaming the average) saves, the last two by what
early rejection saves. The sides alternate (A B C, C B A, ...) and medians are compared. The time
of the soups side is split into BatchNorm recalibration and scoring, to say where it goes."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from bench.common import command, report
from soups import data, evaluate
from soups.evaluate import EvalSet, Scorer
from soups.models import Checkpoint, create_model, load_checkpoint, normalisation, save_checkpoint
from soups.soup import Candidate, greedy_soup

RECIPE = "configs/demo.yaml"


class SeedDataset(torch.utils.data.Dataset):
    """The seed's held-out dataset: opens and decodes the image on every access."""

    def __init__(self, samples: data.Samples, size: int):
        self.samples, self.size = samples, size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, j):
        return torch.from_numpy(data.resized(self.samples.read(j), self.size)), int(self.samples.labels[j])


def seed_greedy(paths, samples, mean, std, workers: int, model_name: str, classes: int, size: int, bn=None):
    """The seed's loop: every candidate soup rebuilt from all its checkpoints, every image decoded
    again, BatchNorm statistics recomputed through a loader when `bn` (training samples) is given."""
    model = create_model(model_name, classes).eval()

    def loader(s):
        return torch.utils.data.DataLoader(SeedDataset(s, size), batch_size=128, num_workers=workers)

    def score(state) -> int:  # every model recalibrated alike, as the product's Scorer does
        model.load_state_dict(state)
        if bn is not None:
            batches = (data.model_input(x, mean, std) for x, _ in loader(bn))
            torch.optim.swa_utils.update_bn(batches, model)
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in loader(samples):  # every image decoded again, for every candidate
                correct += int((model(data.model_input(x, mean, std)).argmax(1) == y).sum())
        return correct

    def average(soup: list[int]) -> dict:
        states = [torch.load(paths[k], weights_only=True)["state_dict"] for k in soup]  # all in memory
        return {
            key: (sum(s[key].double() for s in states) / len(states)).to(states[0][key].dtype)
            if states[0][key].is_floating_point()
            else states[0][key]
            for key in states[0]
        }

    soup = [0]
    best = score(average(soup))
    for k in range(1, len(paths)):
        correct = score(average(soup + [k]))
        if correct >= best:
            soup.append(k)
            best = correct
    return soup


def as_jpegs(samples: data.Samples, folder: Path) -> data.Samples:
    """The images written as JPEG files (their original resolution), keyed as an image folder would."""
    keys = []
    for j in range(len(samples)):
        rel = f"{samples.labels[j]}/{j:05d}.jpg"
        path = folder / rel
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(samples.pixels[samples.rows[j]]).save(path, quality=95)
        keys.append(rel)
    return data.Samples(keys, samples.labels.copy(), keys, samples.classes, folder)


def members(args, splits, val) -> list[dict]:
    """The demo's shared-start sweep for split seed 0, from soup_quality's cache (or trained now)."""
    import os

    from bench.soup_quality import make_sweep

    cache = Path(os.environ.get("SOUPS_CACHE", "~/.cache/soups")).expanduser() / "bench-members"
    sweep_args = SimpleNamespace(recipe=RECIPE, members=args.members, overrides={}, start_overrides={})
    return make_sweep(sweep_args, 0, True, splits, val, cache)


@contextmanager
def timed_recalibration():
    """Seconds spent recomputing BatchNorm statistics while the body runs (in `out[0]`)."""
    out, real = [0.0], evaluate.recalibrate_bn

    def timed(*a, **k):
        t0 = time.perf_counter()
        real(*a, **k)
        out[0] += time.perf_counter() - t0

    evaluate.recalibrate_bn = timed
    try:
        yield out
    finally:
        evaluate.recalibrate_bn = real


def checkpoints(sweep, recipe, n_cls: int, classes: list[str], mean, std, folder: Path) -> list[Path]:
    """The sweep's members saved as checkpoint files, best val accuracy first."""
    order = sorted(range(len(sweep.states)), key=lambda k: -sweep.val[k])
    paths = []
    for rank, k in enumerate(order):
        path = folder / f"m{rank}.pt"
        save_checkpoint(
            Checkpoint(sweep.states[k], recipe.model, n_cls, classes, recipe.img_size, "bench", mean, std),
            path,
        )
        paths.append(path)
    return paths


def timed_sides(args, recipe, n_cls: int, paths, val_files, bn_files, mean, std):
    """Each side's seconds per run (the sides alternated), the picks of each, and, for every run
    of the soups side, its recalibration seconds, val images scored and images recalibrated on."""
    size = recipe.img_size

    def decoded_once(early: bool):
        val = EvalSet.from_decoded(data.decode(val_files, size, args.workers), n_cls)
        bn = EvalSet.from_decoded(data.decode(bn_files, size, args.workers), n_cls)
        scorer = Scorer(create_model(recipe.model, n_cls), val, mean, std, 2 * recipe.batch_size, "cpu", bn)
        score = scorer.correct if early else (lambda s, m: scorer.correct(s, None))
        cands = [Candidate(str(k), lambda p=p: load_checkpoint(p).state_dict) for k, p in enumerate(paths)]
        result = greedy_soup(cands, score, len(val))
        return [int(n) for n in result.ingredients], scorer

    timings = {"seed-style": [], "decode once": [], "soups": []}
    picks, split = {}, []
    for r in range(args.repeats):
        sides = list(timings) if r % 2 == 0 else list(reversed(timings))
        for side in sides:
            start = time.perf_counter()
            if side == "seed-style":
                picks[side] = seed_greedy(
                    paths, val_files, mean, std, args.workers, recipe.model, n_cls, size, bn_files
                )
            else:
                with timed_recalibration() as recal:
                    picks[side], scorer = decoded_once(early=side == "soups")
                if side == "soups":
                    split.append((recal[0], scorer.images_scored, scorer.recalibration_images))
            timings[side].append(time.perf_counter() - start)
        assert len({tuple(p) for p in picks.values()}) == 1, f"picks differ: {picks}"
    return timings, picks, split


def rows(timings: dict, picks: dict, split: list, n: int, held: int, bn_images: int, size: int) -> list[dict]:
    """The report rows: what decoding once saves, what early rejection saves, where soups' time goes."""
    seed_s, once_s, ours_s = (statistics.median(v) for v in timings.values())
    recal_s, scored, recal_images = split[-1]
    what = (
        f"greedy soup, {n} real fine-tunes of the demo (ranked by val), {held} val + {bn_images} "
        f"BatchNorm JPEGs -> {size}px, BatchNorm recalibrated; same picks {picks['soups']}"
    )
    return [
        {
            "what": what + ": decoding once and streaming the average",
            "a": f"seed-style {seed_s:.1f} s",
            "b": f"decode once, full evaluations {once_s:.1f} s",
            "ratio": f"{seed_s / once_s:.2f}x faster",
            "target": "report",
            "ok": None,
        },
        {
            "what": what + ": exact early rejection",
            "a": f"full evaluations {once_s:.1f} s ({n * held} val images)",
            "b": f"early rejection {ours_s:.1f} s ({scored} val images scored)",
            "ratio": f"{once_s / ours_s:.2f}x faster",
            "target": "report",
            "ok": None,
        },
        {
            "what": what + ": where soups' time goes",
            "a": f"BatchNorm recalibration {recal_s:.1f} s ({recal_images} training images forwarded)",
            "b": f"the rest (scoring, loading) {ours_s - recal_s:.1f} s",
            "ratio": f"{100 * recal_s / ours_s:.0f}% recalibration",
            "target": "report",
            "ok": None,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternated")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from soups.recipe import load_recipe, load_splits

    recipe = load_recipe(RECIPE)
    splits = load_splits(recipe)
    size, n_cls = recipe.img_size, len(splits.train.classes)
    val_evalset = EvalSet.from_decoded(data.decode(splits.val, size), n_cls)
    sweep = members(args, splits, val_evalset)
    work = Path(tempfile.gettempdir()) / "soups-bench" / "speed"
    bn_rows = np.sort(np.random.default_rng(0).choice(len(splits.train), 1000, replace=False))
    val_files = as_jpegs(splits.val, work / "val")
    bn_files = as_jpegs(splits.train.subset(bn_rows), work / "bn")
    model = create_model(recipe.model, n_cls)
    mean, std = normalisation(model)
    paths = checkpoints(sweep, recipe, n_cls, splits.val.classes, mean, std, work / "ckpts")
    timings, picks, split = timed_sides(args, recipe, n_cls, paths, val_files, bn_files, mean, std)
    measured = rows(timings, picks, split, len(paths), len(val_files), len(bn_files), size)
    report("soup_speed", measured, command())


if __name__ == "__main__":
    main()
