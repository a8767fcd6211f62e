"""Tracking overhead: steps/s of soups.train.fit with MLflow logging (a real SQLite store) and its
progress bar vs a bare timm training loop doing the same work (AdamW, warmup + cosine, clipping,
label smoothing, the same per-epoch validation) over the same cached batches and model. The two
sides alternate (ABBA...), four times each, and the medians are compared."""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import command, report
from soups.data import model_input
from soups.evaluate import EvalSet, predict
from soups.models import create_model, normalisation
from soups.train import TrainConfig, fit, warmup_cosine

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
    parser.add_argument("--repeats", type=int, default=4)
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
    cfg = TrainConfig(args.epochs, 1e-3, 0.01, 0.1, 1.0, 0.1, 64)
    steps = args.epochs * args.steps
    rates = {"bare": [], "soups": []}
    for r in range(args.repeats):
        for side in ("bare", "soups") if r % 2 == 0 else ("soups", "bare"):  # no order bias
            model = copy.deepcopy(init)
            if side == "bare":
                start = time.perf_counter()
                bare_loop(model, batches, val, cfg, mean, std)
            else:
                with tracking.start("ingredient", "bench-overhead") as run:
                    start = time.perf_counter()
                    fit(model, batches, val, cfg, mean, std, "cpu", run.log_epoch)
            rates[side].append(steps / (time.perf_counter() - start))
    bare, ours = statistics.median(rates["bare"]), statistics.median(rates["soups"])
    overhead = (bare - ours) / bare
    report(
        "tracking_overhead",
        [
            {
                "what": f"steps/s, {MODEL} {SIZE}px, batch 64, {steps} steps, median of {args.repeats} runs",
                "a": f"bare timm loop {bare:.2f} steps/s",
                "b": f"soups.train + MLflow + progress bar {ours:.2f} steps/s",
                "ratio": f"{100 * overhead:+.1f}% overhead",
                "target": "<= 3%",
                "ok": overhead <= 0.03,
            }
        ],
        command(),
    )


if __name__ == "__main__":
    main()
