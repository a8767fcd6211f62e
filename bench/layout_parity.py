"""The same images as Fashion-MNIST's IDX files and as class folders: does the layout change the
soup? The demo recipe end to end through the product's own steps (start: auto, 4 members,
greedy_soup with the uniform soup beside it, BatchNorm recomputed) on both, into one SQLite store,
one experiment per layout. The folders hold exactly the IDX files' images (train/ from the
training file, test/ from the test file, written by scripts/fashion_mnist_folders.py --parts), so
the 10,000 test images are the same; val is cut from train by each layout's own listing.

Before recalibration drew a shuffled sample, class folders fed BatchNorm one class per batch and
their soups lost over a point (FACTS, December 2)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import command, report

IDX = Path("/usr/share/datasets/fashion-mnist")


def pipeline(recipe_path: str, overrides: dict, experiment: str, members: int, method: str = "greedy"):
    """start + members (start: auto) then the soup, as the entry points run them; members an
    earlier run of this benchmark left in the store (`--work`) are judged again, not retrained."""
    from soups import tracking
    from soups.recipe import load_recipe
    from soups.steps.finetune import finetune
    from soups.steps.soup.step import SoupOptions, make_soup

    have = len(tracking.ranked_ingredients(tracking.ensure_experiment(experiment)))
    for i in range(have, members):
        finetune(load_recipe(recipe_path, {**overrides, "experiment": experiment, "i": i}))
    recipe = load_recipe(recipe_path, {**overrides, "experiment": experiment})
    given = {k: overrides[k] for k in ("data", "layout")}
    return make_soup(recipe, given, SoupOptions(method=method), f"{experiment}-soup")


def in_listing_order(n: int, images: int, seed: int = 0) -> np.ndarray:
    """What soups did before: a seeded sample of the training images, kept in listing order."""
    return np.sort(np.random.default_rng(seed).choice(n, images, replace=False)) if images else np.arange(n)


def points(x: float) -> str:
    return f"{100 * x:.2f}"


def method_rows(idx, fold) -> list[dict]:
    """Each soup method's test accuracy on the IDX files (A) and on the class folders (B)."""
    rows = []
    for method in ("greedy", "uniform"):
        a, b = (next(d for d in s.dishes if d.method == method) for s in (idx, fold))
        diff = 100 * (b.test_accuracy - a.test_accuracy)
        rows.append(
            {
                "what": f"{method} soup test accuracy (BatchNorm recomputed), the demo recipe on the same "
                "Fashion-MNIST images as IDX files (A) and as class folders (B)",
                "a": f"{points(a.test_accuracy)} ({a.n_ingredients} kept)",
                "b": f"{points(b.test_accuracy)} ({b.n_ingredients} kept)",
                "ratio": f"{diff:+.2f} points",
                "target": "within 0.3",
                "ok": abs(diff) <= 0.3,
            }
        )
    return rows


def gain_rows(sides: dict) -> list[dict]:
    """On each layout, the registered greedy soup against its best member."""
    rows = []
    for side, rep in sides.items():
        gain = rep.chosen.test_gain
        rows.append(
            {
                "what": f"{side}: the registered greedy soup (A) vs its best member (B), both scored with "
                "BatchNorm recomputed on the same training images, full test set",
                "a": points(rep.chosen.test_accuracy),
                "b": points(rep.best_test_accuracy),
                "ratio": f"{100 * gain.gain:+.2f} points [{100 * gain.low:+.2f}, {100 * gain.high:+.2f}]",
                "target": "> 0",
                "ok": gain.gain > 0,
            }
        )
    return rows


def listing_order_soup(recipe_path: str, folders: Path, members: int):
    """The class folders' uniform soup again, its BatchNorm recomputed in listing order."""
    # The same class-folder members, the uniform soup recalibrated on the same training images in
    # the order the layout lists them (class by class), as soups did before.
    import soups.steps.soup.ingredients as ingredients

    ingredients.recalibration_order = in_listing_order
    folders_args = {"data": str(folders), "layout": "imagefolder"}
    return pipeline(recipe_path, folders_args, "folders", members, "uniform").chosen


def order_row(fold, before) -> dict:
    """The class folders' uniform soup recalibrated in a shuffled order (now) vs in listing order."""
    shuffled = next(d for d in fold.dishes if d.method == "uniform")
    diff = 100 * (shuffled.test_accuracy - before.test_accuracy)
    return {
        "what": "class folders, the same members: uniform soup with BatchNorm recomputed on 1,000 "
        "training images in a shuffled order (A, now) vs the same images in listing order, class "
        "by class (B, before)",
        "a": points(shuffled.test_accuracy),
        "b": points(before.test_accuracy),
        "ratio": f"{diff:+.2f} points",
        "target": ">= 0",
        "ok": diff >= 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/demo.yaml")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument(
        "--work", default="", help="folder for the store and the class folders (default: temp)"
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="soups-parity-"))
    folders = work / "folders"
    if not (folders / "test").is_dir():
        script = Path(__file__).parents[1] / "scripts" / "fashion_mnist_folders.py"
        subprocess.run([sys.executable, str(script), str(folders), "--parts", "--idx", str(IDX)], check=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'parity.db'}"
    os.environ.setdefault("SOUPS_CACHE", str(work / "cache"))
    sides = {
        "IDX files": pipeline(
            args.recipe, {"data": str(IDX), "layout": "fashion-mnist"}, "idx", args.members
        ),
        "class folders": pipeline(
            args.recipe, {"data": str(folders), "layout": "imagefolder"}, "folders", args.members
        ),
    }
    idx, fold = sides["IDX files"], sides["class folders"]
    rows = [*method_rows(idx, fold), *gain_rows(sides)]
    before = listing_order_soup(args.recipe, folders, args.members)
    rows.append(order_row(fold, before))
    report("layout_parity", rows, command())


if __name__ == "__main__":
    main()
