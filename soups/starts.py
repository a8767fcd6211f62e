"""Where a run's weights start: the pretrained ones with a zero head, or a start run's every
weight (checked to come from the same split), and the probe's frozen backbone."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from soups import SoupsError, data, distributed, tracking
from soups.models import create_model, head_keys, load_checkpoint, load_start, weights_digest
from soups.recipe import Recipe, draw, run_name

log = logging.getLogger(__name__)
POLL_S = 5.0  # how often a member waiting for another process's start asks whether it is done


@dataclass(frozen=True)
class Start:
    """The exact weights a run starts from: their digest, the start run they came from (empty for
    the pretrained weights) and where they were read, for the log."""

    digest: str
    run_id: str
    source: str


def auto_start(
    recipe: Recipe,
    split: str,
    experiment_id: str,
    make: Callable[[str], object],
    world: distributed.World = distributed.SINGLE,
) -> str:
    """`start: auto` as find or make, resolved to `runs:/<id>`: the newest finished start run of
    the experiment for this model and split; when there is none, the start is trained here by
    `make(claimed run id)` (every rank takes part; rank 0 alone asks the server) and logged as
    the start run it would have been. Processes that arrive together train it once: one claims
    it, the others wait for that run (tracking/start_claims.py)."""
    waiting = ""
    while True:
        action = None
        if world.is_main:
            action = tracking.next_start_action(experiment_id, recipe.model, split, start_name(recipe))
        action = distributed.broadcast(action, world)
        if action.kind == "use":
            return f"runs:/{action.run_id}"
        if action.kind == "make":
            log.info("start=auto: no start run for model %s on this split yet: training it", recipe.model)
            taken = False
            try:
                claimed(make, action.run_id, world)
            except tracking.TakenOver as e:  # rank 0 alone can tell: every rank hears it below
                log.warning("%s", e)
                taken = True
            if not distributed.broadcast(taken, world):
                return f"runs:/{action.run_id}"
            continue
        if waiting != action.run_id:
            log.info("start=auto: waiting for start run %s, which another process is training", action.run_id)
            waiting = action.run_id
        time.sleep(POLL_S)


def claimed(make: Callable[[str], object], run_id: str, world: distributed.World) -> None:
    """Train the start into the run this process claimed, its heartbeat beating from the claim on
    (listing the data again comes first); a failure before the run is reopened still ends it, so
    that waiters claim again at once instead of after the heartbeat goes stale."""
    beat = tracking.heartbeat(run_id) if world.is_main else contextlib.nullcontext()
    try:
        with beat:
            make(run_id)
    except BaseException:
        if world.is_main:
            tracking.abandon(run_id, "the process that claimed this start failed before training it")
        raise


def start_recipe(recipe: Recipe) -> Recipe:
    """What `-e start` trains for this recipe, whichever member asks: member 0's draw from the
    search space (the member's own draw stays its own), so the start never depends on which
    racer made it."""
    return dataclasses.replace(recipe, i=0, **draw(recipe.space, 0))


def start_name(recipe: Recipe) -> str:
    return run_name("start", dataclasses.replace(recipe, epochs=recipe.start_epochs))


def initial_model(recipe: Recipe, splits: data.Splits, role: str) -> tuple[nn.Module, Start]:
    """The model a run trains, with its starting weights: the pretrained ones with a zero head, or,
    for an ingredient with `start`, every weight of a start checkpoint trained on the same split."""
    classes = splits.train.classes
    if role == "start" or recipe.start == "none":
        pretrained = recipe.pretrained
        if tracking.is_mlflow_uri(pretrained):
            pretrained = str(tracking.checkpoint_for(pretrained))
        model = create_model(recipe.model, len(classes), pretrained)
        return model, Start(weights_digest(model.state_dict()), "", f"pretrained={recipe.pretrained}")
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


def freeze_all_but_head(model: nn.Module) -> None:
    head = head_keys(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in head)
