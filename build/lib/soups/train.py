"""The fine-tuning loop: AdamW, warmup + cosine, gradient clipping, label smoothing; bf16 autocast
and channels_last on CUDA. No MLflow here: each epoch is reported through `on_epoch`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from soups import SoupsError
from soups.data import model_input
from soups.evaluate import EvalSet, autocast, metrics, predict
from soups.losses import CrossEntropy


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    weight_decay: float
    warmup: float
    clip_grad: float
    label_smoothing: float
    batch_size: int
    ema: float = 0.0  # decay of a moving average of the weights that is validated and kept (0: off)


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """LR multiplier at step s: linear warmup to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_mode(model: nn.Module) -> None:
    """Train mode, except BatchNorm layers whose weights are frozen: they keep their statistics
    too, so that a linear probe's backbone is the pretrained one, statistics included."""
    model.train()
    for m in model.modules():
        weights = list(m.parameters(recurse=False))
        if (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            and weights
            and not any(p.requires_grad for p in weights)
        ):
            m.eval()


def fit(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    val: EvalSet,
    cfg: TrainConfig,
    mean: list[float],
    std: list[float],
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, m: None,
    objective: nn.Module | None = None,
    extra_metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Fine-tune `model` in place; returns the last epoch's metrics. `on_epoch(epoch, metrics)`
    gets train_loss, val_loss, val_accuracy, val_f1, images_per_s and `extra_metrics(val logits,
    val labels)` after each epoch (1-based). `objective(model, x, y)` is the loss (default:
    cross-entropy with the config's label smoothing); its own parameters train too."""
    objective = (objective or CrossEntropy(cfg.label_smoothing)).to(device)
    device = torch.device(device)
    if cfg.epochs < 1:
        raise SoupsError(f"epochs={cfg.epochs} must be >= 1")
    if len(loader) == 0:
        raise SoupsError(f"no training batches: {len(loader.dataset)} images, batch_size={cfg.batch_size}")
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    trainable = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]  # norms, biases
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    total = cfg.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, int(cfg.warmup * total)))
    # timm's EMA, warmed up (its decay grows with the steps) so that a short fine-tune averages its
    # own recent weights rather than dragging its starting ones along.
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=True) if cfg.ema > 0 else None
    last: dict[str, float] = {}
    for epoch in range(1, cfg.epochs + 1):
        train_mode(model)
        seen, loss_sum, start = 0, 0.0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, mininterval=1.0)
        for step, (images, labels) in enumerate(bar):
            x = model_input(images.to(device, non_blocking=True), mean, std)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels.to(device, non_blocking=True)
            with autocast(device):
                loss = objective(model, x, y)
            if not torch.isfinite(loss):
                raise SoupsError(
                    f"loss became {loss.item()} at epoch {epoch}, step {step}: lower lr (now {cfg.lr:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model, step=sched.last_epoch)
            seen += len(y)
            loss_sum += loss.item() * len(y)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                img_s=f"{seen / (time.perf_counter() - start):.0f}",
                refresh=False,
            )
        elapsed = time.perf_counter() - start
        logits = predict(ema.module if ema else model, val, mean, std, cfg.batch_size * 2, device)
        scores = metrics(logits, val.labels)
        last = {
            "train_loss": loss_sum / seen,
            "val_loss": scores["loss"],
            "val_accuracy": scores["accuracy"],
            "val_f1": scores["f1"],
            "images_per_s": seen / elapsed,
            **(extra_metrics(logits, val.labels) if extra_metrics else {}),
        }
        on_epoch(epoch, last)
    if ema is not None:  # what was validated is what is kept
        model.load_state_dict(ema.module.state_dict())
    return last
