"""`make bench`: run every benchmark one after the other (never two at once: they would share the
cores) and rewrite docs/BENCHMARKS.md with their rows, the machine and each command."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS

BENCHMARKS = [
    ("soup_speed", []),
    ("soup_memory", []),
    ("tracking_overhead", []),
    ("input_pipeline", []),
    ("soup_quality", []),
    ("layout_parity", []),
    ("ddp_throughput", []),
]


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def main() -> None:
    shutil.rmtree(RESULTS, ignore_errors=True)
    took = {}
    for name, args in BENCHMARKS:
        print(f"== bench/{name}.py", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"bench.{name}", *args], check=True)
        took[name] = time.perf_counter() - start
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench.run_all`); do not edit by hand. Each row measures both",
        "sides in one process or one invocation and reports their ratio: this machine is shared and",
        "noisy, so absolute numbers drift while ratios measured side by side hold.",
        "",
        f"Machine: {machine()}.",
        "",
        "| benchmark | what | side A | side B | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    commands = []
    for name, _ in BENCHMARKS:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        for row in result["rows"]:
            verdict = "" if row.get("ok") is None else ("pass" if row["ok"] else "**miss**")
            cells = [name, row["what"], row["a"], row["b"], row["ratio"], row["target"], verdict]
            lines.append("| " + " | ".join(cells) + " |")
        commands.append(f"- `{name}`: `{result['command']}` ({took[name]:.0f} s)")
    lines += ["", "Commands (run from the repository root, `.venv` active):", "", *commands, ""]
    notes = Path("bench/NOTES.md")
    if notes.exists():
        lines += [notes.read_text()]
    Path("docs").mkdir(exist_ok=True)
    Path("docs/BENCHMARKS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
