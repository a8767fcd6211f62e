"""Where a run's weights start: the pretrained ones with a zero head, or a start run's every
weight (checked to come from the same split), and the probe's frozen backbone."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from soups import SoupsError, data, tracking
from soups.models import create_model, head_keys, load_checkpoint, load_start, weights_digest
from soups.recipe import Recipe


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


def freeze_all_but_head(model: nn.Module) -> None:
    head = head_keys(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in head)
