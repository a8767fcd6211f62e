"""Finding and reading runs on the server (nothing here creates or changes one): ingredients
ranked by val accuracy, the newest start, a run's params and tags, experiments by name or id."""

from __future__ import annotations

import shlex

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError
from soups.tracking.names import (
    CLASSES_PARAM,
    MEMBER_PARAM,
    MODEL_PARAM,
    PRETRAINED_PARAM,
    RANK_METRIC,
    ROLE,
    SPLIT,
    START,
    START_RUN,
    TEST_METRIC,
)
from soups.tracking.registry import model_version
from soups.tracking.server import checked_run_id, configure, quote, shown


def ingredient_filter(extra: str | None = None) -> str:
    """Finished ingredient runs, optionally narrowed by another `search_runs` clause (MLflow
    filters know `and` only)."""
    clauses = [f"tags.`{ROLE}` = 'ingredient'", "attributes.status = 'FINISHED'"]
    return " and ".join(clauses + ([extra] if extra else []))


def find_experiment(name: str) -> str:
    """Id of an existing experiment, or an error naming it and the server."""
    configure()
    exp = MlflowClient().get_experiment_by_name(name)
    if exp is None:
        raise SoupsError(f"experiment {name!r} not found on {shown()}")
    return exp.experiment_id


def experiment_or_own(name: str, run) -> str:
    """The experiment a step reads from: the one named (it must exist), else the step's own run's."""
    return find_experiment(name) if name else run.experiment_id


def ranked_ingredients(experiment_id: str, extra_filter: str | None = None, limit: int = 0) -> list:
    """Finished ingredient runs of an experiment, best `val_accuracy` first, ranked by the
    server; at most `limit` (0: all, paged 1,000 at a time)."""
    client, runs, token = MlflowClient(), [], None
    while True:
        try:
            page = client.search_runs(
                [experiment_id],
                filter_string=ingredient_filter(extra_filter),
                order_by=[f"metrics.{RANK_METRIC} DESC", "attributes.start_time ASC"],
                max_results=min(1000, limit - len(runs)) if limit else 1000,
                page_token=token,
            )
        except MlflowException as e:
            raise SoupsError(
                f"search for ingredient runs failed (filter {extra_filter!r}): {str(e).splitlines()[0]}"
            ) from None
        runs += list(page)
        token = page.token
        if not token or (limit and len(runs) >= limit):
            return runs


def run_params(run) -> dict[str, str]:
    """A run's params as the step that logged them meant them: `mlflow run` logs `-P` values
    shell-quoted (`'/my data'`), the steps themselves log plain strings."""
    out = {}
    for k, v in run.data.params.items():
        if len(v) >= 2 and v[0] == v[-1] == "'":
            parts = shlex.split(v)
            v = parts[0] if len(parts) == 1 else v
        out[k] = v
    return out


def split_of(run) -> str | None:
    return run.data.tags.get(SPLIT)


def member_of(run) -> str | None:
    """The sweep member index `i` a run trained."""
    return run.data.params.get(MEMBER_PARAM)


def model_of(run) -> str | None:
    return run.data.params.get(MODEL_PARAM)


def pretrained_of(run) -> str | None:
    return run.data.params.get(PRETRAINED_PARAM)


def classes_of(run) -> int | None:
    value = run.data.params.get(CLASSES_PARAM)
    return None if value is None else int(value)


def test_score(run) -> float | None:
    """The run's test accuracy, when `evaluate` (or the soup step) logged one."""
    return run.data.metrics.get(TEST_METRIC)


def role_of(run) -> str | None:
    return run.data.tags.get(ROLE)


def start_of(run) -> str | None:
    return run.data.tags.get(START)


def start_run_of(run) -> str | None:
    return run.data.tags.get(START_RUN)


def rank_score(run) -> float | None:
    return run.data.metrics.get(RANK_METRIC)


def split_filter(split: str) -> str:
    """The clause that narrows a search to the runs of one held-out split."""
    return f"tags.`{SPLIT}` = {quote(split)}"


def parent_filter(parent: str) -> str:
    """The clause that narrows a search to the children of a sweep run."""
    return f"tags.mlflow.parentRunId = {quote(checked_run_id(parent, 'parent'))}" if parent else ""


def get_run(run_id: str):
    checked_run_id(run_id)
    configure()
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as e:
        raise SoupsError(f"run {run_id} not found on {shown()}: {str(e).splitlines()[0]}") from None


def has_score(run, split: str) -> bool:
    return f"{split}_accuracy" in run.data.metrics


def soup_metrics(uri: str) -> dict[str, float]:
    """Test accuracies a soup run recorded: its best ingredient, its own soup and each soup it was
    compared with."""
    run = run_of(uri)
    if run is None or run.data.tags.get(ROLE) != "soup":
        return {}
    m, p = run.data.metrics, run.data.params
    out = {
        "best single (soup run)": m.get("best_ingredient_test_accuracy"),
        f"{p.get('method', '?')} soup: this model (soup run)": m.get("test_accuracy"),
    }
    for method in filter(None, p.get("compare", "").split(",")):
        out[f"{method} soup (soup run)"] = m.get(f"{method}_test_accuracy")
    return {k: v for k, v in out.items() if v is not None}


def experiment_of_run(run_id: str) -> str:
    return get_run(run_id).info.experiment_id


def experiment_name(experiment_id: str) -> str:
    return MlflowClient().get_experiment(experiment_id).name


def run_of(uri: str):
    """The run behind a `runs:/` or `models:/` URI (None for a local file)."""
    if uri.startswith("models:/"):
        return get_run(model_version(uri).run_id)
    if uri.startswith("runs:/"):
        return get_run(uri.removeprefix("runs:/").split("/", 1)[0])
    return None


def val_accuracy_of(uri: str) -> float:
    run = run_of(uri)
    if run is None or rank_score(run) is None:
        raise SoupsError(f"weights=val: {uri} has no logged {RANK_METRIC}; give explicit weights")
    return rank_score(run)
