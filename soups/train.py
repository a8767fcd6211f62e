"""The fine-tuning loop: AdamW, warmup + cosine, gradient clipping, label smoothing; bf16 autocast
and channels_last on CUDA. No MLflow here: each epoch is reported through `on_epoch`.

On a CPU the batches are channels_last already (`data.model_input` permutes NHWC pixels), which
is what makes oneDNN's convolutions fast (2.4x an NCHW input in a probe of the demo's training
step); the weights' own format moved the bare loop by 0.92x to 1.04x between runs, noise.
torch.compile is not used: on the demo's CPU training it was slower than eager (476 vs 624 img/s,
after 48 s compiling) and scoring gained 1.12x only after 17 s of compiling, which pays off past
half a million images a process (bench/train_throughput.py)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.utils import ModelEmaV3
from torch import nn
from tqdm.auto import tqdm

from soups import SoupsError
from soups.data import model_input
from soups.distributed import SINGLE, World
from soups.evaluate import EvalSet, autocast, metrics, predict
from soups.losses import CrossEntropy


@dataclass(frozen=True)
class TrainConfig:
    """The values the loop reads, filled from the recipe by name (`steps.finetune.train_config`):
    their defaults and help are the recipe's, declared once in `soups.recipe`."""

    epochs: int
    lr: float
    weight_decay: float
    warmup: float
    clip_grad: float
    label_smoothing: float
    batch_size: int
    ema: float  # decay of a moving average of the weights that is validated and kept (0: off)
    save_every: int  # hand the training state to `on_state` every this many epochs (0: never)
    sync_bn: bool  # with several processes: BatchNorm statistics over the global batch


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


class Loss(nn.Module):
    """The model and its objective as one module: DistributedDataParallel wraps this, so that the
    gradients of every parameter the loss reaches (an objective's own head included) are averaged
    over the processes, whatever parts of the model the objective calls."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.objective(self.model, x, y)


@dataclass
class Loop:
    """One fine-tune's moving parts: what `fit` steps each batch and what a resumed run restores."""

    model: nn.Module
    loss: nn.Module  # Loss, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEmaV3 | None
    loader: torch.utils.data.DataLoader
    device: torch.device
    world: World

    def state(self, epoch: int) -> dict:
        """Everything the next epoch depends on (weights, optimizer, schedule, EMA, random state)."""
        return {
            "epoch": epoch,
            "loss": self.loss.module.state_dict() if self.world.parallel else self.loss.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "loader": self.loader.rng_state() if hasattr(self.loader, "rng_state") else None,
            },
        }

    def restore(self, state: dict) -> int:
        """Continue from `state`; returns the first epoch still to train."""
        (self.loss.module if self.world.parallel else self.loss).load_state_dict(state["loss"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if state["rng"]["loader"] is not None:
            self.loader.set_rng_state(state["rng"]["loader"])
        return int(state["epoch"]) + 1


def build_loop(model, loader, cfg: TrainConfig, device, objective, world: World) -> Loop:
    """Optimizer (AdamW, no decay on norms and biases), warmup + cosine schedule, EMA, and the
    DistributedDataParallel wrapper when there are several processes."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if world.parallel and cfg.sync_bn:
        if device.type != "cuda":
            raise SoupsError(
                "sync_bn=true needs GPUs (PyTorch's SyncBatchNorm is CUDA-only); on CPUs each process "
                "normalises its own share of the batch"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loss = Loss(model, objective.to(device))
    trainable = [p for p in loss.parameters() if p.requires_grad]
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
    if world.parallel:
        # Depthwise kernels' gradients come out with other (equally valid) strides than DDP's
        # buckets: PyTorch warns on every step that it copies them; the copy is the cost.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ids = [device.index] if device.type == "cuda" else None
        loss = nn.parallel.DistributedDataParallel(loss, device_ids=ids)
    return Loop(model, loss, opt, sched, ema, loader, device, world)


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
    *,
    world: World = SINGLE,
    resume: dict | None = None,
    on_state: Callable[[int, dict], None] | None = None,
) -> dict[str, float]:
    """Fine-tune `model` in place; returns the last epoch's metrics. `on_epoch(epoch, metrics)`
    gets train_loss, val_loss, val_accuracy, val_f1, images_per_s and `extra_metrics(val logits,
    val labels)` after each epoch (1-based). `objective(model, x, y)` is the loss (default:
    cross-entropy with the config's label smoothing); its own parameters train too.
    With several processes (`world`), each trains on its share of every batch and rank 0 alone
    validates and reports. `resume` is a state `on_state(epoch, state)` was given (every
    `cfg.save_every` epochs; its tensors are the live ones, so save or copy them during the call):
    training continues after that epoch as if it had never stopped."""
    if cfg.epochs < 1:
        raise SoupsError(f"epochs={cfg.epochs} must be >= 1")
    if len(loader) == 0:
        raise SoupsError(f"no training batches: {len(loader.dataset)} images, batch_size={cfg.batch_size}")
    device = torch.device(device)
    objective = objective or CrossEntropy(cfg.label_smoothing)
    loop = build_loop(model, loader, cfg, device, objective, world)
    first = loop.restore(resume) if resume else 1
    last: dict[str, float] = {}
    for epoch in range(first, cfg.epochs + 1):
        loss_sum, seen, elapsed = train_epoch(loop, epoch, cfg, mean, std)
        if world.is_main:
            validated = loop.ema.module if loop.ema else model
            logits = predict(validated, val, mean, std, cfg.batch_size * 2, device)
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
            if on_state is not None and cfg.save_every and epoch % cfg.save_every == 0 and epoch < cfg.epochs:
                on_state(epoch, loop.state(epoch))
    if loop.ema is not None:  # what was validated is what is kept
        model.load_state_dict(loop.ema.module.state_dict())
    return last


def train_epoch(loop: Loop, epoch: int, cfg: TrainConfig, mean, std) -> tuple[float, int, float]:
    """One pass over this process's batches; returns the loss summed over images, the images and
    the seconds, over all processes together."""
    device = loop.device
    train_mode(loop.model)
    seen, loss_sum, start = 0, 0.0, time.perf_counter()
    bar = tqdm(
        loop.loader,
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="batch",
        leave=False,
        mininterval=1.0,
        disable=not loop.world.is_main,  # one bar, however many processes
    )
    for step, (images, labels) in enumerate(bar):
        x = model_input(images.to(device, non_blocking=True), mean, std)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(device, non_blocking=True)
        with autocast(device):
            loss = loop.loss(x, y)
        if not torch.isfinite(loss):
            raise SoupsError(
                f"loss became {loss.item()} at epoch {epoch}, step {step}: lower lr (now {cfg.lr:g})"
            )
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(loop.model.parameters(), cfg.clip_grad)
        loop.opt.step()
        loop.sched.step()
        if loop.ema is not None:
            loop.ema.update(loop.model, step=loop.sched.last_epoch)
        seen += len(y)
        loss_sum += loss.item() * len(y)
        rate = seen * loop.world.size / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{rate:.0f}", refresh=False)
    elapsed = time.perf_counter() - start
    if loop.world.parallel:  # the epoch's loss and images over every process
        totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        loss_sum, seen = float(totals[0]), int(totals[1])
    return loss_sum, seen, elapsed
