"""An incremental soup against a soup from scratch, on the demo recipe's real pipeline: a start run
and 12 members fine-tuned by `finetune` into an SQLite store (kept under --work: a rerun trains
nothing), then the soup step with its defaults (greedy, accept=split, BatchNorm recomputed on 1,000
training images, the uniform soup beside it, test scored, registered and compared with the
champion). For N = 1 and 4: a soup over the members that arrived first (i < 12 - N), then

- incremental: the soup step over all 12, continuing that soup (`from=<its run>`);
- from scratch: the soup step over all 12, `from=none`.

Both do the whole step (decode val, test and the BatchNorm images, cook, score test, register);
the logits memo is emptied before each, so neither reads the other's test logits. They must choose
the same ingredients. The sides alternate (scratch first for N=1, incremental first for N=4)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import command, report
from soups.models import cache_home
from soups.recipe import load_recipe
from soups.steps.finetune import finetune
from soups.steps.soup.step import SoupOptions, make_soup

MEMBERS = 12


def members(recipe: str, n: int) -> None:
    """Fine-tune members 0..n-1 unless the store has them (the first also makes the start)."""
    from soups import SoupsError, tracking

    try:
        have = {
            tracking.member_of(r) for r in tracking.ranked_ingredients(tracking.find_experiment("Default"))
        }
    except SoupsError:  # an empty store
        have = set()
    for i in range(n):
        if str(i) not in have:
            t = time.perf_counter()
            finetune(load_recipe(recipe, {"i": i}))
            print(f"member {i}: {time.perf_counter() - t:.0f} s", flush=True)


def soup(recipe: str, first: int | None = None, **opts) -> tuple[float, object]:
    """One soup step (over members i < first, or all), timed, with an empty logits memo."""
    shutil.rmtree(cache_home() / "logits", ignore_errors=True)
    where = " and ".join(f"params.i != '{i}'" for i in range(first, MEMBERS)) if first else ""
    t = time.perf_counter()
    out = make_soup(load_recipe(recipe), {}, SoupOptions(filter=where, **opts))
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default="configs/demo.yaml")
    parser.add_argument("--work", default="", help="keeps the store and the members between runs")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="soups-incremental-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("SOUPS_CACHE", str(work / "cache"))
    home = Path.cwd()
    os.chdir(work)  # mlruns/ artifacts beside the store
    recipe = str(Path(__file__).resolve().parents[1] / args.recipe)
    members(recipe, MEMBERS)
    rows = []
    for new in (1, 4):
        _, before = soup(recipe, MEMBERS - new, continue_from="none")
        sides = [("scratch", {"continue_from": "none"}), ("incremental", {"continue_from": before.run_id})]
        timed = dict((name, soup(recipe, **opts)) for name, opts in (sides if new == 1 else sides[::-1]))
        (t_inc, inc), (t_scratch, scratch) = timed["incremental"], timed["scratch"]
        same = inc.chosen.result.ingredients == scratch.chosen.result.ingredients
        print(
            f"N={new}: incremental {t_inc:.1f} s ({inc.history.models_scored} models scored, "
            f"{inc.history.scores_reused} scores reused), from scratch {t_scratch:.1f} s "
            f"({scratch.history.models_scored} models scored); same ingredients: {same}",
            flush=True,
        )
        rows.append(
            {
                "what": f"soup step after {new} new run(s) of {MEMBERS} (demo recipe, real members, "
                "defaults): continuing the earlier soup vs from scratch, whole step",
                "a": f"scratch {t_scratch:.1f} s, {scratch.history.models_scored} models scored",
                "b": f"incremental {t_inc:.1f} s, {inc.history.models_scored} models scored",
                "ratio": f"{t_scratch / t_inc:.2f}x faster",
                "target": "same ingredients; cost grows with the new runs",
                "ok": same and inc.history.models_scored < scratch.history.models_scored,
            }
        )
    os.chdir(home)  # the results go in this repository's bench/results
    report("incremental_soup", rows, command())


if __name__ == "__main__":
    main()
