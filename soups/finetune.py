"""One fine-tune, recipe in, tracked ingredient run out: the wiring between data, models, the
training loop and the tracking contract."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from soups import data, tracking
from soups.augment import pipeline
from soups.evaluate import EvalSet, default_device
from soups.models import Checkpoint, create_model, normalisation, save_checkpoint
from soups.recipe import Recipe, params, to_yaml
from soups.train import TrainConfig, fit

log = logging.getLogger(__name__)


def train_loader(splits: data.Splits, recipe: Recipe) -> tuple[torch.utils.data.DataLoader, int]:
    """Batches of the training split with the recipe's augmentation; decoded images stay in
    memory when they fit in `cache_mb`. Returns the loader and how many images were skipped."""
    size, skipped = recipe.img_size, 0
    source: data.Decoded | data.Samples = splits.train
    if data.fits_in_memory(splits.train, size, recipe.cache_mb):
        source = data.decode(splits.train, size, recipe.workers, recipe.skip_bad, "decode train")
        skipped = len(source.skipped)
    transform = pipeline(recipe.aug, size, recipe.seed)

    def seed_worker(worker_id: int) -> None:  # distinct, reproducible augmentation per worker
        if transform is not None:
            transform.set_random_seed(torch.initial_seed() % 2**32)

    loader = torch.utils.data.DataLoader(
        data.ImageDataset(source, size, transform),
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=len(source.labels) > recipe.batch_size,  # a size-1 last batch breaks BatchNorm
        num_workers=recipe.workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(recipe.seed),
        persistent_workers=False,
    )
    return loader, skipped


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

        def report(epoch: int, metrics: dict[str, float]) -> None:
            run.log_epoch(epoch, metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)

        fit(model, loader, val_set, train_config(recipe), mean, std, default_device(), report)
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
            run.log_checkpoint(path, save_checkpoint(ckpt, path))
    return run.id
