"""`make demo`'s wall time per step, an earlier commit beside this tree: the Makefile's commands
(start, the members, evaluate, greedy_soup with every method, infer with the ensemble) run with
`mlflow run ... --env-manager local` as a user runs them, each tree into its own empty SQLite
store and its own empty cache (checkpoints, logits), one tree after the other on the same images.
The earlier commit is checked out with `git worktree` and imported through PYTHONPATH, so both
sides run the same installed packages. Also says whether each side's registered soup beat its
best member on test."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from bench.common import command, report
from soups import tracking

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = "/usr/share/datasets/fashion-mnist"


def steps(members: int) -> list[tuple[str, list[str]]]:
    """The demo's steps as the Makefile runs them."""
    data = ["-P", f"data={DATA}"]
    out = [("start", ["-e", "start", *data])]
    out += [(f"finetune i={i}", ["-e", "finetune", "-P", f"i={i}", *data]) for i in range(members)]
    out += [
        ("evaluate", ["-e", "evaluate", *data]),
        ("greedy_soup (compare=all)", ["-e", "greedy_soup", *data, "-P", "compare=all"]),
        ("infer (ensemble=top:N)", ["-e", "infer", *data, "-P", f"ensemble=top:{members}"]),
    ]
    return out


def run_demo(tree: Path, work: Path, members: int) -> tuple[dict[str, float], float]:
    """Seconds per step of the demo run from `tree`; and the registered soup's test gain over its
    best member."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "SOUPS_CACHE": str(work / "cache"),
        "PYTHONPATH": str(tree),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_RUN_ID", None)
    took = {}
    for name, args in steps(members):
        start = time.perf_counter()
        subprocess.run(
            [str(BIN / "mlflow"), "run", ".", *args, "--env-manager", "local"],
            cwd=tree,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        took[name] = time.perf_counter() - start
        print(f"  {tree.name}: {name} {took[name]:.0f} s", flush=True)
    return took, soup_result(uri)


def soup_result(uri: str) -> float:
    client = mlflow.MlflowClient(uri)
    soup = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.`{tracking.ROLE}` = 'soup'",
        order_by=["attributes.start_time DESC"],
    )[0]
    return soup.data.metrics.get("test_gain_over_best_ingredient", float("nan"))  # the registered one's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default="04fe0c1", help="the earlier commit (git ref)")
    parser.add_argument("--members", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soups-demo-steps-") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before), args.before],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            sides = {}
            for label, tree in (("before", before), ("after", ROOT)):
                (tmp / f"{label}-store").mkdir()
                sides[label] = run_demo(tree, tmp / f"{label}-store", args.members)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    (b, b_gain), (a, a_gain) = sides["before"], sides["after"]
    rows = [
        {
            "what": f"demo step {name}: {args.before} vs this tree, one after the other",
            "a": f"before {b[name]:.0f} s",
            "b": f"after {a[name]:.0f} s",
            "ratio": f"{b[name] / a[name]:.2f}x faster",
            "target": "",
            "ok": None,
        }
        for name in b
    ]
    total_b, total_a = sum(b.values()), sum(a.values())
    rows.append(
        {
            "what": f"`make demo`'s steps in all ({args.members} members; the registered soup's test gain "
            f"over its best member {100 * b_gain:+.2f} points before, {100 * a_gain:+.2f} after)",
            "a": f"before {total_b / 60:.1f} min",
            "b": f"after {total_a / 60:.1f} min",
            "ratio": f"{total_b / total_a:.2f}x faster",
            "target": "after <= 6 min, the soup above its best member",
            "ok": total_a <= 360 and a_gain > 0,
        }
    )
    report("demo_steps", rows, command())


if __name__ == "__main__":
    main()
