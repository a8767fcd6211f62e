"""Tracking overhead: a whole tracked fine-tune (run creation, params, soups.train.fit with per-epoch
MLflow metrics and its progress bar, the checkpoint saved and uploaded, the run ended, on a real
SQLite store) vs a bare timm training loop doing the same work (AdamW, warmup + cosine, clipping,
label smoothing, the same per-epoch validation, the weights saved to a file) over the same cached
batches and model. A third side logs the epoch metrics asynchronously (MLflow's
`synchronous=False`), the alternative `tracking.Run.log_epoch` was measured against. The sides
rotate (ABC, BCA, CAB, ...) and the medians are compared."""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.entities import Metric

from bench.common import command, report
from soups.data import model_input
from soups.evaluate import EvalSet, predict
from soups.models import create_model, normalisation
from soups.recipe import Recipe
from soups.steps.finetune import train_config
from soups.train import fit, warmup_cosine

MODEL, SIZE = "tf_efficientnet_lite0", 48


def bare_loop(model, batches, val, cfg, mean, std) -> None:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    total = cfg.epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, int(cfg.warmup * total)))
    for _ in range(cfg.epochs):
        model.train()
        for x, y in batches:
            loss = F.cross_entropy(model(model_input(x, mean, std)), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            loss.item()
        predict(model, val, mean, std, 2 * cfg.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='soups-bench-')}/mlflow.db"
    from soups import tracking

    torch.manual_seed(0)
    init = create_model(MODEL, 10)
    mean, std = normalisation(init)
    batches = [
        (torch.randint(0, 255, (64, SIZE, SIZE, 3), dtype=torch.uint8), torch.randint(0, 10, (64,)))
        for _ in range(args.steps)
    ]
    val = EvalSet(
        torch.randint(0, 255, (64, SIZE, SIZE, 3), dtype=torch.uint8), torch.randint(0, 10, (64,)), 10
    )
    cfg = train_config(Recipe(epochs=args.epochs, batch_size=64))  # the product's defaults otherwise
    steps = args.epochs * args.steps
    sides = ("bare", "soups", "async")
    rates = {side: [] for side in sides}
    work = Path(tempfile.mkdtemp(prefix="soups-bench-ckpt-"))
    for r in range(args.repeats):
        for side in sides[r % 3 :] + sides[: r % 3]:  # every order position for every side
            model = copy.deepcopy(init)
            start = time.perf_counter()
            if side == "bare":
                bare_loop(model, batches, val, cfg, mean, std)
                torch.save(model.state_dict(), work / "bare.pt")
            else:
                tracked(tracking, model, batches, val, cfg, mean, std, work, synchronous=side == "soups")
            rates[side].append(steps / (time.perf_counter() - start))
    bare, ours, unsynced = (statistics.median(rates[s]) for s in sides)
    report("tracking_overhead", rows(bare, ours, unsynced, steps, args.repeats), command())


def rows(bare: float, ours: float, unsynced: float, steps: int, repeats: int) -> list[dict]:
    """The report rows: soups' overhead over the bare loop, and synchronous vs asynchronous metrics."""
    overhead, async_overhead = (bare - ours) / bare, (bare - unsynced) / bare
    what = f"steps/s of a whole fine-tune, {MODEL} {SIZE}px, batch 64, {steps} steps"
    what += f", median of {repeats} runs"
    return [
        {
            "what": what,
            "a": f"bare timm loop + torch.save {bare:.2f} steps/s",
            "b": "soups run: create, params, fit + MLflow + progress bar, checkpoint upload, end "
            f"{ours:.2f} steps/s",
            "ratio": f"{100 * overhead:+.1f}% overhead",
            "target": "<= 3%",
            "ok": overhead <= 0.03,
        },
        {
            "what": what + ", epoch metrics logged synchronously vs asynchronously",
            "a": f"synchronous (what soups does) {ours:.2f} steps/s",
            "b": f"asynchronous {unsynced:.2f} steps/s",
            "ratio": f"{100 * async_overhead:+.1f}% vs {100 * overhead:+.1f}% overhead",
            "target": "report",
            "ok": None,
        },
    ]


def tracked(tracking, model, batches, val, cfg, mean, std, work: Path, synchronous: bool) -> None:
    """What `finetune` does around the loop, timed from the run's creation to its end."""
    from soups.models import Checkpoint, save_checkpoint

    with tracking.start("ingredient", "bench-overhead") as run:
        run.log_params({"lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "model": MODEL})
        if synchronous:
            report_epoch = run.log_epoch
        else:

            def report_epoch(epoch, metrics):
                now = int(time.time() * 1000)
                items = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
                run.client.log_batch(run.id, metrics=items, synchronous=False)

        fit(model, batches, val, cfg, mean, std, "cpu", report_epoch)
        ckpt = Checkpoint(
            model.state_dict(), MODEL, 10, [str(c) for c in range(10)], SIZE, "bench", mean, std
        )
        path = work / "model.pt"
        run.log_checkpoint(path, save_checkpoint(ckpt, path))


if __name__ == "__main__":
    main()
