"""One fine-tune, recipe in, tracked ingredient run out: the wiring between data, models, the
training loop and the tracking contract."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from soups import SoupsError, data, tracking
from soups.augment import pipeline
from soups.evaluate import EvalSet, default_device
from soups.losses import objective
from soups.models import Checkpoint, create_model, normalisation, save_checkpoint
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


def attribute_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mask layout: val accuracy of each attribute (mask, gender, age) on its own."""
    true, pred = data.mask_attributes(labels.numpy()), data.mask_attributes(logits.argmax(1).numpy())
    return {f"val_{a}_accuracy": float((true[a] == pred[a]).mean()) for a in data.MASK_ATTRIBUTES}


def train_config(recipe: Recipe) -> TrainConfig:
    return TrainConfig(**{f: getattr(recipe, f) for f in TrainConfig.__dataclass_fields__})


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
    with tracking.start("ingredient", recipe.experiment, parent, tags) as run:
        if on_start is not None:
            on_start(run.id)
        run.log_params(params(recipe))
        run.log_recipe(to_yaml(recipe))
        torch.manual_seed(recipe.seed)
        splits = data.load_splits(recipe)
        run.log_split(splits.fingerprint)
        if recipe.relabel:
            run.log_relabel(splits.relabelled, Path(recipe.relabel))
        classes = splits.train.classes
        pretrained = recipe.pretrained
        if tracking.is_mlflow_uri(pretrained):
            pretrained = str(tracking.checkpoint_for(pretrained))
        model = create_model(recipe.model, len(classes), pretrained)
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
        val_set = EvalSet.from_decoded(val, len(classes))

        offline: list[int] = []  # epochs whose metrics the server did not take

        def report(epoch: int, metrics: dict[str, float]) -> None:
            try:
                run.log_epoch(epoch, metrics)
            except tracking.Unreachable as e:  # keep training: the weights matter more than a curve
                if not offline:
                    log.warning(
                        "%s: training goes on; the checkpoint will be kept locally if it stays down", e
                    )
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
        extra = attribute_accuracy if recipe.layout == "mask" else None
        fit(model, loader, val_set, train_config(recipe), mean, std, default_device(), report, loss, extra)
        ckpt = Checkpoint(
            model.state_dict(),
            model=recipe.model,
            num_classes=len(classes),
            classes=list(classes),
            img_size=recipe.img_size,
            split=splits.fingerprint,
            mean=mean,
            std=std,
        )
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


UNLOGGED = Path("unlogged-checkpoints")


def keep_locally(path: Path, run_id: str) -> Path:
    """Move a checkpoint the server would not take to ./unlogged-checkpoints/<run id>/model.pt."""
    dst = (UNLOGGED / run_id / path.name).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, dst)
    return dst
