"""One fine-tune, recipe in, tracked ingredient run out: the wiring between data, models, the
training loop and the tracking contract."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from soups import SoupsError, data, layouts, tracking
from soups.augment import pipeline
from soups.evaluate import EvalSet, default_device
from soups.losses import objective
from soups.models import (
    Checkpoint,
    create_model,
    head_keys,
    load_checkpoint,
    load_start,
    normalisation,
    save_checkpoint,
    weights_digest,
)
from soups.recipe import Recipe, params, to_yaml
from soups.train import TrainConfig, fit

log = logging.getLogger(__name__)


def oversampled_classes(spec: str, classes: list[str]) -> list[int]:
    """Class indices named by `oversample`: names or indices, comma-separated, or `old`."""
    picked = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        if item == "old":
            old = [j for j, c in enumerate(classes) if c.rsplit("/", 1)[-1].startswith(">=")]
            if not old:
                raise SoupsError("oversample=old needs the mask layout's age classes")
            picked += old
        elif item in classes:
            picked.append(classes.index(item))
        elif item.isdigit() and int(item) < len(classes):
            picked.append(int(item))
        else:
            raise SoupsError(f"oversample: {item!r} is not a class (classes: {', '.join(classes[:6])}, ...)")
    return sorted(set(picked))


def train_loader(splits: data.Splits, recipe: Recipe) -> tuple[torch.utils.data.DataLoader, int]:
    """Batches of the training split with the recipe's augmentation, plus the `oversample`
    classes repeated with their own augmentation, drawn from the training split alone; decoded
    images stay in memory when they fit in `cache_mb`. Returns the loader and how many images
    were skipped as unreadable."""
    size, skipped = recipe.img_size, 0
    source: data.Decoded | data.Samples = splits.train
    if data.fits_in_memory(splits.train, size, recipe.cache_mb):
        source = data.decode(splits.train, size, recipe.workers, recipe.skip_bad, "decode train")
        skipped = len(source.skipped)
    transform = pipeline(recipe.aug, size, recipe.seed)
    parts = [data.ImageDataset(source, size, transform)]
    extra_transform = None
    if recipe.oversample and recipe.oversample_factor > 1:
        targets = oversampled_classes(recipe.oversample, splits.train.classes)
        rows = np.flatnonzero(np.isin(source.labels, targets))
        extra_transform = pipeline(recipe.oversample_aug, size, recipe.seed + 1)
        parts += [data.ImageDataset(source.subset(rows), size, extra_transform)] * (
            recipe.oversample_factor - 1
        )

    def seed_worker(worker_id: int) -> None:  # distinct, reproducible augmentation per worker
        for t, offset in ((transform, 0), (extra_transform, 1)):
            if t is not None:
                t.set_random_seed((torch.initial_seed() + offset) % 2**32)

    dataset = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=len(dataset) > recipe.batch_size,  # a size-1 last batch breaks BatchNorm
        num_workers=recipe.workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(recipe.seed),
        persistent_workers=False,
    )
    return loader, skipped


def attribute_accuracy(attributes):
    """For a layout whose labels combine attributes (mask x gender x age): val accuracy of each
    attribute on its own, as `val_<attribute>_accuracy`."""

    def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        true, pred = attributes.split(labels.numpy()), attributes.split(logits.argmax(1).numpy())
        return {f"val_{a}_accuracy": float((true[a] == pred[a]).mean()) for a in attributes.names}

    return scores


def train_config(recipe: Recipe) -> TrainConfig:
    return TrainConfig(**{f: getattr(recipe, f) for f in TrainConfig.__dataclass_fields__})


@dataclass(frozen=True)
class Start:
    """The exact weights a run starts from: their digest, the start run they came from (empty for
    the pretrained weights) and where they were read, for the log."""

    digest: str
    run_id: str
    source: str


def initial_model(
    recipe: Recipe, splits: data.Splits, experiment_id: str, role: str
) -> tuple[nn.Module, Start]:
    """The model a run trains, with its starting weights: the pretrained ones with a zero head, or,
    for an ingredient with `start`, every weight of a start checkpoint trained on the same split."""
    classes = splits.train.classes
    if role == "start" or recipe.start == "none":
        pretrained = recipe.pretrained
        if tracking.is_mlflow_uri(pretrained):
            pretrained = str(tracking.checkpoint_for(pretrained))
        model = create_model(recipe.model, len(classes), pretrained)
        return model, Start(weights_digest(model.state_dict()), "", f"pretrained={recipe.pretrained}")
    if recipe.start == "auto":
        found = tracking.newest_start(experiment_id, recipe.model, splits.fingerprint)
        path, start_run = tracking.cached_checkpoint(found)[0], found.info.run_id
    else:
        path = tracking.checkpoint_for(recipe.start)
        run = tracking.run_of(recipe.start)
        start_run = run.info.run_id if run is not None else ""
    ckpt = load_checkpoint(path)
    if ckpt.split != splits.fingerprint or list(ckpt.classes) != list(classes):
        raise SoupsError(
            f"start {recipe.start} was trained on split {ckpt.split} with {len(ckpt.classes)} classes, this "
            f"run uses split {splits.fingerprint} with {len(classes)}: a start trained on other data may "
            "have seen this run's val or test images; make a start with this recipe (`-e start`)"
        )
    model = create_model(recipe.model, len(classes))
    load_start(model, ckpt.state_dict, recipe.start)
    return model, Start(weights_digest(model.state_dict()), start_run, f"start={recipe.start} ({path})")


def finetune(
    recipe: Recipe,
    parent: tracking.Run | None = None,
    tags: dict | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> str:
    """Fine-tune sweep member `recipe.i` and log it as an ingredient run (a child of `parent` in a
    sweep); `on_epoch` also sees each epoch's metrics and may raise `soups.Stopped`. Returns the
    run id."""
    return tracked_training("ingredient", recipe, parent, tags, on_epoch, on_start)


def make_start(recipe: Recipe) -> str:
    """The shared starting weights of a sweep, trained once and logged as a `start` run:
    `start_epochs` epochs of member `i`'s draw, every weight (`start_mode=finetune`) or the head
    alone (`probe`). Members given `start` continue from its every weight, head included, which
    keeps them in one basin: their average is then a model, not a blur. Returns the run id."""
    return tracked_training("start", dataclasses.replace(recipe, epochs=recipe.start_epochs))


def tracked_training(
    role: str,
    recipe: Recipe,
    parent: tracking.Run | None = None,
    tags: dict | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> str:
    with tracking.start_step(role, recipe, run_name(role, recipe), parent, tags) as run:
        if on_start is not None:
            on_start(run.id)
        run.log_params(params(recipe))
        run.log_recipe(to_yaml(recipe))
        torch.manual_seed(recipe.seed)
        splits = data.load_splits(recipe)
        run.log_split(splits.fingerprint)
        if recipe.relabel:
            run.log_relabel(splits.relabelled, Path(recipe.relabel))
        run.log_datasets(data_parts(recipe, splits, ("training", "validation")))
        model, start = initial_model(recipe, splits, run.experiment_id, role)
        log.info("%s starts from %s (weights %s…)", role, start.source, start.digest[:12])
        run.log_start(start.digest, start.run_id)
        run.describe(training_note(role, recipe, splits, start, run.experiment_id))
        if role == "start" and recipe.start_mode == "probe":
            freeze_all_but_head(model)
        ckpt = train(run, recipe, splits, model, on_epoch)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            digest = save_checkpoint(ckpt, path)
            try:
                run.log_checkpoint(path, digest)
            except tracking.Unreachable as e:
                kept = keep_locally(path, run.id)
                raise SoupsError(
                    f"{e}: the trained checkpoint is kept at {kept} (sha256 {digest[:12]}…); run {run.id} "
                    "stays unfinished, so no soup takes it; fine-tune again or load it with pretrained="
                    f"{kept}"
                ) from None
    return run.id


def run_name(role: str, recipe: Recipe) -> str:
    """`finetune i=3 lr=1.2e-03`, `start ft 3 ep`: what a person looks for in the runs table."""
    if role == "start":
        return f"start {'ft' if recipe.start_mode == 'finetune' else 'probe'} {recipe.epochs} ep"
    return f"finetune i={recipe.i} lr={recipe.lr:.1e}"


CONTEXT_SPLIT = {"training": "train", "validation": "val", "test": "test"}


def data_part(recipe: Recipe, part: str, samples: data.Samples, context: str) -> tracking.DataPart:
    """One part of the recipe's data as an MLflow dataset input (`<data folder>/<part>`)."""
    name, root = f"{data.data_name(recipe.data)}/{part}", str(data.data_root(recipe.data))
    return tracking.DataPart(name, root, data.digest(samples), context, len(samples))


def data_parts(recipe: Recipe, splits: data.Splits, contexts) -> list[tracking.DataPart]:
    """The recipe's data as MLflow dataset inputs, one per context (training, validation, test)."""
    parts = ((context, CONTEXT_SPLIT[context]) for context in contexts)
    return [
        data_part(recipe, part, getattr(splits, part), context)
        for context, part in parts
        if len(getattr(splits, part))
    ]


def training_note(role: str, recipe: Recipe, splits: data.Splits, start: Start, experiment_id: str) -> str:
    """The run's description: what it is, its draw, and where it started from."""
    drawn = ", ".join(
        f"{k} {getattr(recipe, k):.3g}"
        if isinstance(getattr(recipe, k), float)
        else f"{k} {getattr(recipe, k)}"
        for k in sorted(recipe.space)
    )
    what = (
        f"**Shared start** of a sweep: {recipe.epochs} epochs ({recipe.start_mode}) of member "
        f"{recipe.i}'s draw."
        if role == "start"
        else f"**Sweep member {recipe.i}**, {recipe.epochs} epochs."
    )
    origin = (
        f"{tracking.run_link(start.run_id, experiment_id, 'start run ' + start.run_id[:8])}"
        if start.run_id
        else f"the pretrained weights (`{recipe.pretrained}`, head at zero)"
    )
    return (
        f"{what}\n\n- model `{recipe.model}` at {recipe.img_size} px, data `{data.data_name(recipe.data)}` "
        f"({len(splits.train)} training, {len(splits.val)} val images; split `{splits.fingerprint}`)\n"
        f"- draw: {drawn or 'none (no search space)'}\n"
        f"- started from {origin}, weights `{start.digest[:12]}`"
    )


def freeze_all_but_head(model: nn.Module) -> None:
    head = head_keys(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in head)


def train(
    run: tracking.Run,
    recipe: Recipe,
    splits: data.Splits,
    model: nn.Module,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> Checkpoint:
    """Fit `model` on the training split, reporting each epoch to `run` (training goes on while
    the server is away) and to `on_epoch`; returns its checkpoint."""
    classes = splits.train.classes
    mean, std = normalisation(model)
    loader, skipped = train_loader(splits, recipe)
    val = data.decode(splits.val, recipe.img_size, recipe.workers, recipe.skip_bad, "decode val")
    run.log_params(
        {
            "num_classes": len(classes),
            "n_train": len(loader.dataset),
            "n_val": len(val.labels),
            "n_test": len(splits.test),
            "skipped_images": skipped + len(val.skipped),
        }
    )
    offline: list[int] = []  # epochs whose metrics the server did not take
    best = {"best_val_accuracy": -1.0, "best_val_epoch": 0}  # a summary users sort the runs table by

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if metrics["val_accuracy"] > best["best_val_accuracy"]:
            best.update(best_val_accuracy=metrics["val_accuracy"], best_val_epoch=epoch)
        try:
            run.log_epoch(epoch, metrics)
        except tracking.Unreachable as e:  # keep training: the weights matter more than a curve
            if not offline:
                log.warning("%s: training goes on; the checkpoint will be kept locally if it stays down", e)
            offline.append(epoch)
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    loss = objective(
        recipe.loss,
        model,
        label_smoothing=recipe.label_smoothing,
        focal_gamma=recipe.focal_gamma,
        supcon_weight=recipe.supcon_weight,
    )
    attributes = layouts.get(recipe.layout).attributes
    extra = attribute_accuracy(attributes) if attributes is not None else None
    val_set = EvalSet.from_decoded(val, len(classes))
    fit(model, loader, val_set, train_config(recipe), mean, std, default_device(), report, loss, extra)
    with contextlib.suppress(tracking.Unreachable):  # the checkpoint upload says it, in one line
        run.log_summary(best)
    return Checkpoint(
        model.state_dict(),
        model=recipe.model,
        num_classes=len(classes),
        classes=list(classes),
        img_size=recipe.img_size,
        split=splits.fingerprint,
        mean=mean,
        std=std,
    )


UNLOGGED = Path("unlogged-checkpoints")


def keep_locally(path: Path, run_id: str) -> Path:
    """Move a checkpoint the server would not take to ./unlogged-checkpoints/<run id>/model.pt."""
    dst = (UNLOGGED / run_id / path.name).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, dst)
    return dst
