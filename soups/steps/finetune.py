"""One fine-tune, recipe in, tracked ingredient run out: the wiring between data, models, the
training loop and the tracking contract."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from soups import SoupsError, data, distributed, layouts, tracking
from soups.batches import train_loader
from soups.evaluate import EvalSet, attribute_accuracy, default_device
from soups.losses import objective
from soups.models import Checkpoint, create_model, keep_locally, normalisation, save_checkpoint
from soups.options import option
from soups.recipe import Recipe, from_params, load_splits, loader_settings, params, run_name, to_yaml
from soups.run_notes import data_parts, training_note
from soups.starts import auto_start, freeze_all_but_head, initial_model, start_recipe
from soups.train import TrainConfig, fit

log = logging.getLogger(__name__)


def train_config(recipe: Recipe) -> TrainConfig:
    return TrainConfig(**{f: getattr(recipe, f) for f in TrainConfig.__dataclass_fields__})


@dataclass(frozen=True)
class TrainingOptions:
    """How a fine-tune (or start) runs, beside what it trains (the recipe)."""

    nproc: int = option(
        1,
        "Processes that train together, data-parallel on this machine (one per GPU; gloo on CPUs): "
        "launches torchrun for you. Several machines: start torchrun yourself (README).",
    )
    resume: str = option(
        "",
        "Continue this run id in place from its last training state (kept with save_every), after "
        "a kill, a preemption or a lost tracking server; the recipe comes from the run.",
    )


def finetune(
    recipe: Recipe,
    parent: tracking.Run | None = None,
    tags: dict | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    resume: str = "",
) -> str:
    """Fine-tune sweep member `recipe.i` and log it as an ingredient run (a child of `parent` in a
    sweep); `on_epoch` also sees each epoch's metrics and may raise `soups.Stopped`. `resume`
    continues that run instead, from its last training state. Returns the run id."""
    return tracked_training("ingredient", recipe, parent, tags, on_epoch, on_start, resume)


def resume(run_id: str, given: dict | None = None) -> str:
    """Continue ingredient or start run `run_id` in place from its last training state, with the
    recipe it logged (`given` overrides the data options, for data that moved) and the very start
    it began from. Returns the run id ("" on ranks other than 0)."""
    world = distributed.from_env()
    with distributed.joined(world):
        found = None
        if world.is_main:  # only rank 0 reads the tracking server; the others get what it read
            run = tracking.resumable(tracking.checked_run_id(run_id, "resume"))
            recipe = from_params(tracking.run_params(run), given or {})
            start_run = tracking.start_run_of(run)
            found = (
                tracking.role_of(run),
                replace(recipe, start=f"runs:/{start_run}" if start_run else "none"),
            )
        role, recipe = distributed.broadcast(found, world)
        return tracked_training(role, recipe, resume=run_id)


def make_start(recipe: Recipe, claimed: str = "") -> str:
    """The shared starting weights of a sweep, trained once and logged as a `start` run:
    `start_epochs` epochs of member `i`'s draw, every weight (`start_mode=finetune`) or the head
    alone (`probe`). Members given `start` continue from its every weight, head included, which
    keeps them in one basin: their average is then a model, not a blur. `claimed`: the start run
    `start: auto` created for it. Returns the run id."""
    return tracked_training("start", replace(recipe, epochs=recipe.start_epochs), claimed=claimed)


def tracked_training(
    role: str,
    recipe: Recipe,
    parent: tracking.Run | None = None,
    tags: dict | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    resume: str = "",
    claimed: str = "",
) -> str:
    """Train and log one run; under `torchrun` every process trains its share and rank 0 alone
    logs (the others return ""). `resume`: continue that run from its last saved training state;
    `claimed`: train into that start run, created beforehand. The data is read before any run
    exists, so a wrong `data` or `layout` leaves no failed run behind, and an ingredient's
    `start: auto` is found or made (`starts.auto_start`) before its own run starts."""
    world = distributed.from_env()
    with distributed.joined(world):
        splits = load_splits(recipe)
        if role == "ingredient" and recipe.start == "auto":
            experiment_id = tracking.step_experiment(recipe.experiment, parent) if world.is_main else ""
            make = partial(make_start, start_recipe(recipe))
            start = auto_start(recipe, splits.fingerprint, experiment_id, make, world)
            recipe = replace(recipe, start=start)
        if not world.is_main:
            return train_silently(role, recipe, splits, world)
        if role == "start":  # what start: auto looks for while it trains (tracking/start_claims.py)
            tags = {**(tags or {}), tracking.START_FOR: tracking.start_key(recipe.model, splits.fingerprint)}
        name = run_name(role, recipe)
        with tracking.start_step(role, recipe, name, parent, tags, resume, claimed) as run:
            if on_start is not None:
                on_start(run.id)
            with tracking.heartbeat(run.id):
                model = prepare(run, role, recipe, splits)
                state = tracking.training_state(resume) if resume else None
                ckpt = train(run, recipe, splits, model, on_epoch, world, state)
                if role == "start":
                    tracking.check_still_claimed(run.id)
                upload(run, ckpt)
    return run.id


def prepare(run: tracking.Run, role: str, recipe: Recipe, splits: data.Splits) -> nn.Module:
    """The run's params, recipe, split, dataset inputs, starting weights and description."""
    run.log_params(params(recipe))
    run.log_recipe(to_yaml(recipe))
    torch.manual_seed(recipe.seed)
    run.log_split(splits.fingerprint)
    if recipe.relabel:
        run.log_relabel(splits.relabelled, Path(recipe.relabel))
    run.log_datasets(data_parts(recipe, splits, ("training", "validation")))
    model, start = initial_model(recipe, splits, role)
    log.info("%s starts from %s (weights %s…)", role, start.source, start.digest[:12])
    run.log_start(start.digest, start.run_id)
    run.describe(training_note(role, recipe, splits, start, run.experiment_id))
    if role == "start" and recipe.start_mode == "probe":
        freeze_all_but_head(model)
    return model


def train_silently(role: str, recipe: Recipe, splits: data.Splits, world: distributed.World) -> str:
    """A rank other than 0: the same split and model, its share of every batch, no tracking. Its
    starting weights are rank 0's (DistributedDataParallel broadcasts them)."""
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model, len(splits.train.classes))
    if role == "start" and recipe.start_mode == "probe":
        freeze_all_but_head(model)
    loader, _ = train_loader(splits, loader_settings(recipe), world, training_device(world))
    state = distributed.broadcast(None, world)
    fit(
        model,
        loader,
        None,
        train_config(recipe),
        *normalisation(model),
        training_device(world),
        objective=loss_of(recipe, model),
        world=world,
        resume=state and state["loop"],
    )
    return ""


def upload(run: tracking.Run, ckpt: Checkpoint) -> None:
    """The checkpoint into the run; when the server is gone, kept locally and said in one line."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / tracking.CHECKPOINT_FILE
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


def train(
    run: tracking.Run,
    recipe: Recipe,
    splits: data.Splits,
    model: nn.Module,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    world: distributed.World = distributed.SINGLE,
    state: dict | None = None,
) -> Checkpoint:
    """Fit `model` on the training split, reporting each epoch to `run` (training goes on while
    the server is away) and to `on_epoch`, and keeping the training state every `save_every`
    epochs; `state` continues a run from one. Returns the checkpoint."""
    classes = splits.train.classes
    mean, std = normalisation(model)
    loader, skipped = train_loader(splits, loader_settings(recipe), world, training_device(world))
    val = data.decode(splits.val, recipe.img_size, recipe.workers, recipe.skip_bad, "decode val")
    run.log_training_data(
        len(classes),
        len(loader.dataset),
        len(val.labels),
        len(splits.test),
        skipped + len(val.skipped),
        world.size,
    )
    report = Reporter(run, on_epoch, state["best"] if state else None)
    attributes = layouts.get(recipe.layout).attributes
    extra = attribute_accuracy(attributes) if attributes is not None else None
    val_set = EvalSet.from_decoded(val, len(classes))
    state = distributed.broadcast(state, world)
    fit(
        model,
        loader,
        val_set,
        train_config(recipe),
        mean,
        std,
        training_device(world),
        report,
        loss_of(recipe, model),
        extra,
        world=world,
        resume=state and state["loop"],
        on_state=report.keep_state,
    )
    with contextlib.suppress(tracking.Unreachable):  # the checkpoint upload says it, in one line
        run.log_summary(report.best)
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


class Reporter:
    """Rank 0's side of the loop: each epoch's metrics into the run (kept going while the server
    is away), the best epoch as a summary, and the training state as an artifact."""

    def __init__(self, run: tracking.Run, on_epoch, best: dict | None = None):
        self.run, self.on_epoch, self.offline = run, on_epoch, []
        self.best = best or {"best_val_accuracy": -1.0, "best_val_epoch": 0}  # what users sort by

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if metrics[tracking.RANK_METRIC] > self.best["best_val_accuracy"]:
            self.best = {"best_val_accuracy": metrics[tracking.RANK_METRIC], "best_val_epoch": epoch}
        try:
            self.run.log_epoch(epoch, metrics)
        except tracking.Unreachable as e:  # keep training: the weights matter more than a curve
            if not self.offline:
                log.warning("%s: training goes on; the checkpoint will be kept locally if it stays down", e)
            self.offline.append(epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics)

    def keep_state(self, epoch: int, loop_state: dict) -> None:
        try:
            tracking.keep_training_state(self.run, {"loop": loop_state, "best": self.best}, epoch)
        except tracking.Unreachable as e:  # the last state the server took stays the one to resume
            log.warning("training state of epoch %d not kept: %s", epoch, e)


def loss_of(recipe: Recipe, model: nn.Module) -> nn.Module:
    return objective(
        recipe.loss,
        model,
        label_smoothing=recipe.label_smoothing,
        focal_gamma=recipe.focal_gamma,
        supcon_weight=recipe.supcon_weight,
    )


def training_device(world: distributed.World) -> torch.device:
    return distributed.device_for(world) if world.parallel else default_device()
