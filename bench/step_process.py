"""A step's process from start to exit, Python's teardown at the end beside the frozen exit the
entry points use (entrypoints/common.py): the same real fine-tune (the test suite's tiny timm
model on 200 generated Fashion-MNIST images, one epoch, logged to a fresh SQLite store), run as
`python entrypoints/finetune.py`, the two sides alternated. The teardown side only takes the
freeze out of the step's exit; everything else is the same process.

The fixed cost a step pays before and after its work is what the demo's members and the test
suite's hundreds of step processes pay again and again."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import command, report

ROOT = Path(__file__).resolve().parents[1]

# Runs entrypoints/finetune.py as `python entrypoints/finetune.py` would, with (teardown side) the
# step's freeze at exit (`entrypoints.common.freeze_at_exit`) left out.
LAUNCH = """
import runpy, sys
sys.path.insert(0, {root!r})
import entrypoints.common
if {teardown}:
    entrypoints.common.freeze_at_exit = lambda: None
sys.argv = ["entrypoints/finetune.py", *{args!r}]
runpy.run_path("entrypoints/finetune.py", run_name="__main__")
"""


def one_run(teardown: bool, recipe: Path, store: Path, i: int) -> float:
    """Seconds from starting the process to its exit."""
    code = LAUNCH.format(root=str(ROOT), teardown=teardown, args=["--recipe", str(recipe), "--i", str(i)])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "SOUPS_CACHE": f"{store}.cache"}
    env.pop("MLFLOW_RUN_ID", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=4, help="runs of each side, alternated")
    args = parser.parse_args()
    from tests.conftest import TINY, make_fashion_mnist, write_recipe

    work = Path(tempfile.mkdtemp(prefix="soups-bench-step-"))
    data = make_fashion_mnist(work / "fmnist", n_train=200)
    recipe = write_recipe(
        work / "r.yaml", experiment="step", data=str(data), layout="fashion-mnist", **{**TINY, "epochs": 1}
    )
    one_run(False, recipe, work / "mlflow.db", 0)  # warm: the store's tables, the .pyc files
    took, i = {True: [], False: []}, 1
    for r in range(args.repeats):
        for teardown in (True, False) if r % 2 == 0 else (False, True):
            took[teardown].append(one_run(teardown, recipe, work / "mlflow.db", i))
            i += 1  # a new member each time: the same work, never a finished run's
    slow, fast = statistics.median(took[True]), statistics.median(took[False])
    what = (
        f"one tiny fine-tune as a step process (test_efficientnet, 200 images, 1 epoch, SQLite), start to "
        f"exit, median of {args.repeats}: Python's teardown vs the frozen exit"
    )
    row = {"what": what, "a": f"teardown {slow:.2f} s", "b": f"frozen {fast:.2f} s", "ratio": ""}
    row.update(ratio=f"{slow - fast:.2f} s less ({slow / fast:.2f}x)", target="report", ok=None)
    report("step_process", [row], command())


if __name__ == "__main__":
    main()
