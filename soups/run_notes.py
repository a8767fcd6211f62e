"""What a training run says about itself in MLflow: its name in the runs table, its Markdown
description, and the data it used as dataset inputs (shared by every step that logs a run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from soups import SoupsError, data, tracking
from soups.recipe import Recipe, from_params, load_splits

if TYPE_CHECKING:
    from soups.starts import Start


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


def rebuilt(run, given: dict) -> tuple[Recipe, data.Splits]:
    """The recipe a run logged (the data options in `given` win: data that moved) and its split
    rebuilt from it, checked against the fingerprint the run recorded: a soup or an evaluation
    scores exactly the images the run was ranked on, or refuses."""
    recipe = from_params(tracking.run_params(run), given)
    splits = load_splits(recipe)
    if splits.fingerprint != tracking.split_of(run):
        raise SoupsError(
            f"the held-out split rebuilt from run {run.info.run_id}'s params (data={recipe.data}) has "
            f"fingerprint {splits.fingerprint}, the run recorded {tracking.split_of(run)}: "
            "pass -P data=<folder> where that run's data lives"
        )
    return recipe, splits
