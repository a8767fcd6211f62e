"""The model registry: a soup logged as an MLflow model and registered with its lineage, the
`champion` alias moved only when it wins, and `models:/` references resolved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError
from soups.tracking.names import (
    CHAMPION,
    CHAMPION_WHY,
    INGREDIENT_RUNS,
    MAX_NOTE_LENGTH,
    METHOD,
    MODEL_NAME,
    RANK_METRIC,
    SOUP_RUN,
    SPLIT,
    START,
    START_RUN,
    TEST_METRIC,
)


@dataclass(frozen=True)
class Lineage:
    """Where a registered soup came from, as tags on its model version."""

    soup_run: str
    method: str
    ingredients: list[str]
    start: str
    start_run: str
    split: str
    val_accuracy: float
    test_accuracy: float | None

    def tags(self) -> dict[str, str]:
        return {
            SOUP_RUN: self.soup_run,
            METHOD: self.method,
            INGREDIENT_RUNS: ",".join(self.ingredients),
            START: self.start,
            START_RUN: self.start_run,
            SPLIT: self.split,
            RANK_METRIC: f"{self.val_accuracy:.4f}",
            TEST_METRIC: "" if self.test_accuracy is None else f"{self.test_accuracy:.4f}",
        }


def register(
    checkpoint: Path,
    name: str,
    val_accuracy: float,
    split: str,
    lineage: Lineage | None = None,
    note: str = "",
) -> tuple[int, str]:
    """Log the soup as an MLflow model serving images (in the active run), register it as a
    version of `name` with its lineage and description, and move alias `champion` to it when it
    beats the champion's val accuracy on the same split. Returns the version and what happened to
    the alias."""
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(Path(__file__).parent / "served_model.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).parents[1])],
        registered_model_name=name,
    )
    version = int(info.registered_model_version)
    client = MlflowClient()
    if note:
        client.update_model_version(name, str(version), description=note[:MAX_NOTE_LENGTH])
    for key, value in (lineage.tags() if lineage else {}).items():
        client.set_model_version_tag(name, str(version), key, value[:MAX_NOTE_LENGTH])
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name,
            description=f"Model soups made by soups; `models:/{name}@{CHAMPION}` is the best on val.",
        )
    return version, promote(name, version, val_accuracy, split)


def promote(name: str, version: int, val_accuracy: float, split: str) -> str:
    """Move alias `champion` of `name` to `version` when it beats the current champion's val
    accuracy on the same held-out split (a tie keeps the champion)."""
    client = MlflowClient()
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    if champ is None or champ.run_id is None:
        client.set_registered_model_alias(name, CHAMPION, str(version))
        why = f"the first {CHAMPION} (val {val_accuracy:.4f} on split {split})"
        client.set_model_version_tag(name, str(version), CHAMPION_WHY, why)
        return f"{name} version {version} is {why}"
    data = client.get_run(champ.run_id).data
    theirs, their_split = data.metrics.get(RANK_METRIC), data.tags.get(SPLIT)
    if their_split != split:
        return (
            f"{name}@{CHAMPION} stays version {champ.version}: it was scored on split {their_split}, this "
            f"soup on {split} (move it by hand: MlflowClient().set_registered_model_alias)"
        )
    if theirs is None or val_accuracy > theirs:
        client.set_registered_model_alias(name, CHAMPION, str(version))
        why = f"val {val_accuracy:.4f} beats version {champ.version}'s {theirs} on split {split}"
        client.set_model_version_tag(name, str(version), CHAMPION_WHY, why)
        return f"{name}@{CHAMPION} moved to version {version}: val {val_accuracy:.4f} beats {theirs}"
    return (
        f"{name}@{CHAMPION} stays version {champ.version}: val {theirs:.4f} >= this soup's {val_accuracy:.4f}"
    )


def model_version(uri: str):
    """The registry entry behind `models:/<name>@<alias>` or `models:/<name>/<version>`."""
    client = MlflowClient()
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = ref.partition("/")
        return client.get_model_version(name, version)
    except MlflowException:
        known = [
            f"{m.name} ({', '.join(f'@{a}' for a in m.aliases) or 'no alias'})"
            for m in client.search_registered_models(max_results=20)
        ]
        listing = "; ".join(known) if known else "none"
        raise SoupsError(
            f"{uri} does not resolve on {mlflow.get_tracking_uri()}; registered models: {listing}"
        ) from None
