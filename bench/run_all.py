"""`make bench`: run the benchmarks one after the other (never two at once: they would share the
cores), each keeping its rows in bench/results/<name>.json, then render docs/BENCHMARKS.md from
every results file there: rows, date, machine, command and wall time of each, and the prose of
bench/NOTES.md. `python -m bench.run_all soup_memory` reruns one; `--render` only rewrites the doc."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import RESULTS

BENCHMARKS = [
    "train_throughput",
    "demo_steps",
    "soup_speed",
    "soup_memory",
    "tracking_overhead",
    "input_pipeline",
    "soup_quality",
    "layout_parity",
    "ddp_throughput",
    "tracking_load",
    "incremental_soup",
    "step_process",
]
DOC = Path("docs/BENCHMARKS.md")


def render() -> str:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))}
    results = {k: v for k, v in results.items() if isinstance(v, dict) and "rows" in v}  # not raw data
    order = [n for n in BENCHMARKS if n in results] + sorted(set(results) - set(BENCHMARKS))
    lines = [
        "# Benchmarks",
        "",
        "Rendered by `python -m bench.run_all` from `bench/results/*.json`, which each benchmark writes",
        "when it runs; do not edit by hand (prose goes in `bench/NOTES.md`, included below). Each row",
        "measures both sides in one process or one invocation and reports their ratio: absolute",
        "numbers drift with the machine's load while ratios measured side by side hold.",
        "",
        "| benchmark | what | side A | side B | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in order:
        for row in results[name]["rows"]:
            verdict = "" if row.get("ok") is None else ("pass" if row["ok"] else "**miss**")
            cells = [name, row["what"], row["a"], row["b"], row["ratio"], row["target"], verdict]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "Each benchmark's command (from the repository root, `.venv` active), when it ran and where:",
        "",
    ]
    for name in order:
        r = results[name]
        lines.append(
            f"- `{name}`: `{r['command']}`, {r.get('seconds', '?')} s on {r.get('date', '?')}, "
            f"{r.get('machine', 'machine not recorded')}"
        )
    missing = [n for n in BENCHMARKS if n not in results]
    if missing:
        lines += [
            "",
            "Not measured yet with the current results format: " + ", ".join(f"`{n}`" for n in missing) + ".",
        ]
    notes = Path("bench/NOTES.md")
    if notes.exists():
        lines += ["", notes.read_text()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--render", action="store_true", help="run nothing; rewrite the doc from the results")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(
            f"unknown benchmark(s) {', '.join(sorted(unknown))}: choose from {', '.join(BENCHMARKS)}"
        )
    for name in [] if args.render else args.names or BENCHMARKS:
        print(f"== bench/{name}.py", flush=True)
        subprocess.run([sys.executable, "-m", f"bench.{name}"], check=True)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"{DOC} rendered from {len(list(RESULTS.glob('*.json')))} results files")


if __name__ == "__main__":
    main()
