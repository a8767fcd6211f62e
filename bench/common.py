"""Shared by the benchmarks: realistic generated images and one way to report a row.

Every benchmark measures both sides in one process (or one invocation) and prints the ratio: the
machine is shared and noisy, so absolute times drift but ratios measured side by side hold."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(os.environ.get("SOUPS_BENCH_RESULTS", "bench/results"))  # kept in git: the doc's source
STARTED = time.time()  # this benchmark's process began: its wall time in the results


def photo(rng: np.random.Generator, height: int = 512, width: int = 384) -> Image.Image:
    """A JPEG-realistic picture: smooth shapes plus noise (flat colour would compress unrealistically)."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        img[..., c] = 127 + 80 * np.sin(fx * x + fy * y + phase)
    cy, cx, r = rng.integers(100, 400), rng.integers(80, 300), rng.integers(40, 120)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] *= rng.uniform(0.4, 1.4, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def mask_dataset(root: Path, persons: int, seed: int = 0) -> Path:
    """A mask-layout folder of 384x512 JPEGs (7 per person)."""
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    stems = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]
    for p in range(persons):
        folder = (
            root / "train" / "images" / f"{p:06d}_{('male', 'female')[p % 2]}_Asian_{(20, 45, 65)[p % 3]}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            photo(rng).save(folder / f"{stem}.jpg", quality=90)
    done.touch()
    return root


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def machine() -> str:
    """This machine in one line: cores, CPU, memory, GPU, Python and torch."""
    import platform

    import torch

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
        f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def report(name: str, rows: list[dict], command: str, seconds: float | None = None) -> None:
    """Print the rows and keep them, with the date, this machine, the command and its wall time,
    in bench/results/<name>.json: docs/BENCHMARKS.md is rendered from those files
    (`python -m bench.run_all --render`), so one benchmark reruns without the others.
    Each row: what, a, b, ratio, target, ok."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for row in rows:
        verdict = "" if row.get("ok") is None else ("  PASS" if row["ok"] else "  MISS")
        print(
            f"{row['what']}: {row['a']} | {row['b']} | ratio {row['ratio']} (target {row['target']}){verdict}"
        )
    result = {
        "name": name,
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "seconds": round(time.time() - STARTED if seconds is None else seconds),
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def command() -> str:
    """How to rerun this benchmark, from the repository root."""
    module = os.path.relpath(sys.argv[0]).removesuffix(".py").replace(os.sep, ".")
    return " ".join(["python -m", module, *sys.argv[1:]])
