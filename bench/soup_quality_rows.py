"""The soup-quality benchmark's report rows: each soup method and the ensemble against the best
single member, and the shared-start sweep's best soup against the independent sweep's best member,
as mean ± standard error over the split seeds (bench/soup_quality.py measures them)."""

from __future__ import annotations

import math
import statistics

from soups.soup import METHODS

DEFAULT_METHOD = "greedy"  # what `greedy_soup` registers when no method is given


def rows(runs: dict, methods: list[str], args) -> list[dict]:
    """The report rows from the per-seed results (`one_seed`'s, by split seed)."""
    seeds = list(runs)
    first = runs[seeds[0]]
    n_test = first["test images"]
    out = []
    for side in [s for s in ("shared start", "independent") if s in first]:
        epochs = first[side]["epochs per member"]
        where = (
            f"{len(seeds)} split seeds x {args.members} members, {side} ({epochs} epochs per member), "
            f"{n_test} test images"
        )
        best = [runs[s][side]["best single"] for s in seeds]
        for name in [*methods, "soft-voting ensemble"]:
            values = [runs[s][side][name] for s in seeds]
            gains = [100 * (v - b) for v, b in zip(values, best, strict=True)]
            kept = [runs[s][side].get(f"{name} kept") for s in seeds]
            row = {
                "what": f"test accuracy, {where}" + (f"; ingredients kept {kept}" if kept[0] else ""),
                "a": f"best single {pm(best)}",
                "b": f"{label(name)} {pm(values)}",
                "ratio": points(gains),
                "target": "report",
                "ok": None,
            }
            if side == "shared start" and name == DEFAULT_METHOD:
                intervals = [runs[s][side][f"{name} interval"] for s in seeds]
                row["what"] += "; 95% intervals per seed " + ", ".join(
                    f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in intervals
                )
                row["target"] = ">= +0.4 on average, >= -0.1 on every seed, >= 2 kept on every seed"
                row["ok"] = mean(gains) >= 0.4 and min(gains) >= -0.1 and min(kept) >= 2
            out.append(row)
    if "independent" in first:
        shared_best = {s: max((runs[s]["shared start"][m], m) for m in methods) for s in seeds}
        best_method = max(methods, key=lambda m: mean([runs[s]["shared start"][m] for s in seeds]))
        values = [runs[s]["shared start"][best_method] for s in seeds]
        indep = [runs[s]["independent"]["best single"] for s in seeds]
        gains = [100 * (v - b) for v, b in zip(values, indep, strict=True)]
        out.append(
            {
                "what": f"test accuracy, {len(seeds)} split seeds, equal epochs per member "
                f"({first['shared start']['epochs per member']}): independent sweep's best single vs the "
                f"shared-start sweep's best soup method on average ({best_method}; best per seed "
                f"{[m for _, m in shared_best.values()]})",
                "a": f"independent best single {pm(indep)}",
                "b": f"shared-start {best_method} {pm(values)}",
                "ratio": points(gains),
                "target": ">= 0 on average",
                "ok": mean(gains) >= 0,
            }
        )
    return out


def label(name: str) -> str:
    """`greedy (default: accept=split)`: the method as `greedy_soup` runs it with no parameters."""
    if name != DEFAULT_METHOD:
        return name
    given = ", ".join(f"{p.name}={p.default}" for p in METHODS[name].params if p.name == "accept")
    return f"{name} (default: {given})" if given else name


def points(gains: list[float]) -> str:
    return f"{mean(gains):+.2f} ± {se(gains):.2f} points (per seed {', '.join(f'{g:+.2f}' for g in gains)})"


def mean(values) -> float:
    return statistics.mean(values)


def se(values) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def pm(values: list[float]) -> str:
    return (
        f"{100 * mean(values):.2f} ± {100 * se(values):.2f} ({', '.join(f'{100 * v:.2f}' for v in values)})"
    )
