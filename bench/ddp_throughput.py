"""Data-parallel fine-tuning on this machine: training images per second of one demo fine-tune
(tf_efficientnet_lite0 at 48 px, batch 64, the demo's Fashion-MNIST and pretrained weights) as
one process against two `torchrun` processes (gloo on the CPU; NCCL where there are GPUs), both
through `entrypoints/finetune.py` exactly as a user runs it, sides alternated (A B B A).

On GPUs this is the number users care about (N GPUs against 1); on a 2-core CPU it shows what
splitting the same cores between two processes costs or gains."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

from bench.common import command, report

ROOT = Path(__file__).resolve().parents[1]


def fine_tune(work: Path, nproc: int, args) -> float:
    """Images per second of the training epoch(s) of one fine-tune with `nproc` processes."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [
        sys.executable,
        str(ROOT / "entrypoints" / "finetune.py"),
        "--recipe",
        args.recipe,
        "--experiment",
        "bench-ddp",
        "--start",
        "none",
        "--epochs",
        str(args.epochs),
        "--max_train",
        str(args.images),
        "--nproc",
        str(nproc),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"fine-tune with nproc={nproc} failed:\n{out.stderr[-3000:]}")
    run_id = out.stdout.split("ingredient run ")[-1].split()[0]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    rates = [m.value for m in client.get_metric_history(run_id, "images_per_s")]
    assert client.get_run(run_id).data.params["processes"] == str(nproc)
    return statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="configs/demo.yaml")
    parser.add_argument("--images", type=int, default=1536, help="training images (max_train)")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, 2, 2, 1):
            rates[nproc].append(fine_tune(Path(tmp), nproc, args))
            print(f"nproc={nproc}: {rates[nproc][-1]:.1f} img/s", flush=True)
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    where = "GPUs" if __import__("torch").cuda.is_available() else "CPU cores"
    report(
        "ddp_throughput",
        [
            {
                "what": f"training img/s of a demo fine-tune (tf_efficientnet_lite0 48px, batch 64, "
                f"{args.images} images, {args.epochs} epoch), through finetune.py, on this machine's "
                f"{where}, median of 2 each, alternated",
                "a": f"1 process {one:.1f} img/s",
                "b": f"2 torchrun processes {two:.1f} img/s",
                "ratio": f"{two / one:.2f}x",
                "target": "report",
                "ok": None,
            }
        ],
        command(),
    )


if __name__ == "__main__":
    main()
