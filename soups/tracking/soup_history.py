"""The earlier soup a soup step continues: the one `from` names (the champion by default), the
runs it considered and its book of held-out scores (artifact `soup_book.json`)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError
from soups.tracking.names import ROLE, SOUP_BOOK
from soups.tracking.promotion import champion
from soups.tracking.registry import model_version
from soups.tracking.search import get_run, split_of, start_of

AUTO, NONE = "auto", "none"


@dataclass(frozen=True)
class Earlier:
    """The soup continued (`run_id` empty: none, `why` says why), what it considered, its scores."""

    run_id: str = ""
    considered: list[str] = field(default_factory=list)
    book: dict = field(default_factory=dict)
    why: str = ""


def earlier_soup(spec: str, registered: str, split: str, start: str) -> Earlier:
    """The soup to continue. `auto`: the champion of `registered` when it was made on this split
    from this start, else none (starting over is then what continuing would be); `none`: none;
    `models:/<name>@<alias>`, `models:/<name>/<version>` or a soup run id: that one, and an error
    when it cannot be continued here."""
    if spec == NONE:
        return Earlier(why="from=none: starting over")
    if spec == AUTO:
        champ = champion(registered)
        if champ is None or not champ.run_id:
            return Earlier(why=f"no {registered}@champion yet: starting over")
        where = f"the champion {registered} version {champ.version}"
        try:
            run = get_run(champ.run_id)
        except SoupsError:
            return Earlier(why=f"{where}: its soup run {champ.run_id} is gone: starting over")
    elif spec.startswith("models:/"):
        run, where = get_run(model_version(spec).run_id), spec
    else:
        run, where = get_run(spec), f"run {spec}"
    why = mismatch(run, split, start, where)
    if why is None:
        try:
            doc = read_book(run.info.run_id)
            return Earlier(run.info.run_id, list(doc.get("considered", [])), doc.get("book", {}))
        except SoupsError as e:
            why = str(e)
    if spec != AUTO:
        raise SoupsError(f"from={spec}: {why}; -P from=none starts over")
    return Earlier(why=f"{why}: starting over")


def mismatch(run, split: str, start: str, where: str) -> str | None:
    if run.data.tags.get(ROLE) != "soup":
        return f"{where} is not a soup run ({ROLE}={run.data.tags.get(ROLE)})"
    if split_of(run) != split:
        return f"{where} was made on split {split_of(run)}, this soup is on {split}"
    if not start_of(run):
        return f"{where} was made before soups recorded a soup's start and scores"
    if start_of(run) != start:
        return f"{where} averaged runs of another start ({start_of(run)[:12]}…)"
    return None


def read_book(run_id: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(MlflowClient().download_artifacts(run_id, SOUP_BOOK, tmp))
            doc = json.loads(path.read_text())
        except (MlflowException, OSError, ValueError) as e:
            raise SoupsError(
                f"soup run {run_id} has no readable {SOUP_BOOK}: {str(e).splitlines()[0]}"
            ) from None
    if not isinstance(doc, dict):
        raise SoupsError(f"soup run {run_id}: {SOUP_BOOK} is not a JSON object")
    return doc
