"""The MLflow contract (../DESIGN.md): the one module that knows MLflow's API and every name the
steps share (params, metrics, tags, artifact paths). Nothing else in soups imports mlflow."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import re
import shlex
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups import SoupsError, Stopped
from soups.models import sha256

log = logging.getLogger(__name__)

# Tags
ROLE = "soups.role"  # start | ingredient | evaluation | soup | inference | sweep
SPLIT = "soups.split"  # fingerprint of the held-out file lists
START = "soups.start"  # weights_digest of the exact weights a run started from
START_RUN = "soups.start_run"  # the start run those weights came from (absent: the pretrained ones)
SHA256 = "soups.sha256"  # of the checkpoint artifact
STOPPED = "soups.stopped"  # why training stopped early (a pruned sweep trial)
STUDY = "soups.study"  # the Optuna study of a sweep and its trials
TRIAL = "optuna_trial"
# Artifacts
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT = f"{CHECKPOINT_DIR}/model.pt"
RECIPE = "recipe.yaml"
INGREDIENTS = "ingredients.csv"
SOUP_CURVE = "soup_curve.png"  # the chosen method's curve (greedy: val accuracy after k candidates)
VAL_VS_TEST = "val_vs_test.png"
SCORES = "scores.csv"
PER_CLASS_ERRORS = "per_class_errors.csv"
PREDICTIONS = "predictions.csv"
SKIPPED = "unreadable_images.csv"
MODEL_NAME = "model"  # the logged MLflow model of a soup run
# Ranking metric and the per-epoch metrics of an ingredient run (step = epoch)
RANK_METRIC = "val_accuracy"
SOUP_STEP_METRIC = "soup_val_accuracy"  # the chosen method's curve: greedy, step k = after k candidates
CHAMPION = "champion"
CHAMPION_WHY = "soups.champion_because"  # on a model version: why the alias moved to it
NOTE = "mlflow.note.content"  # a run's, a model version's or an experiment's Markdown description
EXPERIMENT_KIND = "mlflow.experimentKind"  # the UI opens an experiment in its model-training view
MAX_NOTE_LENGTH = 8000  # MLflow keeps tag values up to this many characters
CACHE_ENV = "SOUPS_CACHE"  # where downloaded checkpoints are kept, by run id

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call
MAX_PARAM_LENGTH = 6000

QUIET_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def configure() -> str:
    """Pick the tracking URI (MLFLOW_TRACKING_URI, else ./mlflow.db), quiet MLflow down, and make
    sure a SQLite store exists before anything else uses it. Returns the URI."""
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri())
    create_store(uri)
    if uri.startswith(("http://", "https://")):
        check_access(uri)
    return uri


@functools.cache
def check_access(uri: str) -> None:
    """One request to the server (once per process): a refused login or an unreachable server is
    a one-line error here, not a traceback in the middle of a step."""
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        if e.get_http_status_code() in (401, 403) or e.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            hint = f"user {who!r} was refused" if who else "no credentials given"
            raise SoupsError(
                f"tracking server {uri} refused access ({hint}): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD"
            ) from None
        if unreachable(e):
            raise Unreachable(
                f"tracking server {uri} unreachable: is it running? ({str(e).splitlines()[0][-120:]})"
            ) from None
        raise


def create_store(uri: str) -> None:
    """Create a SQLite tracking store once, under a file lock: several processes migrating a fresh
    store at the same time crash in MLflow's schema migration."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if db.is_file() and db.stat().st_size > 0:
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def experiment_id(name: str) -> str:
    """Id of experiment `name`, creating it if needed (a concurrent creator wins harmlessly)."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise SoupsError(
                f"experiment {name!r} is deleted: restore it (`mlflow experiments restore`) "
                "or pick another name"
            )
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass(frozen=True)
class DataPart:
    """One part of a dataset a run used: its name (`<data>/<split>`), where it lives, a digest
    that changes exactly when its images or labels do, its context (training / validation /
    test / inference) and its size."""

    name: str
    source: str
    digest: str
    context: str
    images: int


class Run:
    """The active run, with the few things the steps log into it."""

    def __init__(self, run_id: str, named_by_user: bool = False):
        self.id = run_id
        self.client = MlflowClient()
        self.named_by_user = named_by_user  # `mlflow run --run-name`: the steps never rename it

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params that the run does not hold yet. `mlflow run` has already logged the `-P`
        values as typed (`1e-3`, quoted paths); re-logging a param with another string raises."""
        held = self.client.get_run(self.id).data.params
        items = [
            mlflow.entities.Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in held
        ]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        # Synchronous on purpose: MLflow's asynchronous logging thread cost 17% of the training
        # steps/s on 2 cores (bench/tracking_overhead.py); one batch per epoch costs ~1%.
        with reachable():
            self.log_metrics(metrics, step=epoch)

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Log the metrics that have a value (a dataset without a test split has no test score)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.id, metrics=items)

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Metrics that sum a run up (no step): what the runs table sorts by."""
        with reachable():
            self.log_metrics(metrics)

    def log_recipe(self, text: str) -> None:
        self.client.log_text(self.id, text, RECIPE)

    def log_relabel(self, changes, source: Path) -> None:
        """The corrections file as given, every changed label, and how many changed."""
        import pandas as pd

        self.client.log_artifact(self.id, str(source), "relabel")
        frame = pd.DataFrame(list(changes), columns=["image", "old_label", "new_label"])
        self.log_table(frame, "relabel/changed_labels.csv")
        self.log_metrics({"relabelled_images": len(frame)})

    def log_split(self, fingerprint: str) -> None:
        self.client.set_tag(self.id, SPLIT, fingerprint)

    def rename(self, name: str) -> None:
        """Name the run, unless a person named it."""
        if not self.named_by_user:
            self.client.update_run(self.id, name=name[:250])

    def describe(self, markdown: str) -> None:
        """The run's description in the UI (Markdown)."""
        self.client.set_tag(self.id, NOTE, markdown[:MAX_NOTE_LENGTH])

    def log_datasets(self, datasets: list[DataPart]) -> None:
        """The data a run trained on or was scored on, as MLflow dataset inputs (the UI's Dataset
        column and Datasets page)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for part in datasets:
            with warnings.catch_warnings():
                # MLflow registers its local-file source twice and warns that a path is ambiguous.
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(part.source)
            dataset = MetaDataset(source, name=part.name, digest=part.digest)._to_mlflow_entity()
            tags = [InputTag(MLFLOW_DATASET_CONTEXT, part.context), InputTag("images", str(part.images))]
            inputs.append(DatasetInput(dataset, tags))
        # Runs that start together log the same dataset at once, and MLflow's SQL store can then
        # refuse the second insert of that dataset row: once more finds the row there. A dataset
        # input is what the UI shows, never worth failing a fine-tune for.
        for attempt in range(3):
            try:
                with reachable():
                    self.client.log_inputs(self.id, datasets=inputs)
                return
            except MlflowException as e:
                if attempt == 2:
                    log.warning("run %s: dataset inputs not logged: %s", self.id, str(e).splitlines()[0])
                time.sleep(0.5 * (attempt + 1))

    def log_start(self, digest: str, start_run: str = "") -> None:
        """Which exact weights this run started from: ingredients of one soup must share them."""
        self.set_tags({START: digest, **({START_RUN: start_run} if start_run else {})})

    def log_checkpoint(self, path: Path, digest: str) -> None:
        """Upload `path` as `checkpoint/model.pt`, then tag its sha256: a run carries the tag only
        once its checkpoint is whole."""
        if Path(path).name != Path(CHECKPOINT).name:
            raise ValueError(f"checkpoint file must be named {Path(CHECKPOINT).name}")
        with reachable():
            self.client.log_artifact(self.id, str(path), CHECKPOINT_DIR)
            self.client.set_tag(self.id, SHA256, digest)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.id).info.experiment_id

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.id, k, str(v))

    def finish(self) -> None:
        self.client.set_terminated(self.id, "FINISHED")

    def log_table(self, frame, name: str) -> None:
        self.client.log_text(self.id, frame.to_csv(index=False), name)

    def log_figure(self, figure, name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.id, figure, name)
        plt.close(figure)

    def log_soup(self, soup) -> None:
        """A `soup_step.SoupReport`: the soup's params, metrics (the chosen method's as
        `val_accuracy`, `test_accuracy`; each compared method's as `<method>_val_accuracy`, ...),
        the chosen method's curve and the ingredient table."""
        self.log_params(soup.params)
        chosen = soup.chosen
        metrics = {
            "val_accuracy": chosen.val_accuracy,
            "test_accuracy": chosen.test_accuracy,
            "n_ingredients": chosen.n_ingredients,
            "best_ingredient_val_accuracy": soup.best_val_accuracy,
            "best_ingredient_test_accuracy": soup.best_test_accuracy,
            "val_gain_over_best_ingredient": chosen.val_accuracy - soup.best_val_accuracy,
            "test_gain_over_best_ingredient": None
            if chosen.test_accuracy is None or soup.best_test_accuracy is None
            else chosen.test_accuracy - soup.best_test_accuracy,
            "n_usable": soup.n_usable,
            "held_out_images_scored": soup.images_scored,
            "held_out_images_full_evaluation": soup.images_full,
            "bn_recalibration_images": soup.recalibration_images,
            "checkpoints_downloaded": soup.downloaded,
            **{f"{chosen.method}_{k}": v for k, v in chosen.result.details.items()},
        }
        for dish in soup.dishes[1:]:
            if dish.result is not None and (dish.n_ingredients > 1 or dish.method != "uniform"):
                metrics |= {
                    f"{dish.method}_val_accuracy": dish.val_accuracy,
                    f"{dish.method}_test_accuracy": dish.test_accuracy,
                    f"{dish.method}_n_ingredients": dish.n_ingredients,
                    **{f"{dish.method}_{k}": v for k, v in dish.result.details.items()},
                }
        self.log_metrics(metrics)
        for x, correct in chosen.result.curve:
            self.log_metrics({SOUP_STEP_METRIC: correct / chosen.result.held_out}, step=x)
        self.log_table(soup.table, INGREDIENTS)

    def log_inference(
        self, results: dict[str, tuple[float | None, float | None, float]], images: int, unreadable: int
    ) -> None:
        """Per predictor (`soup`, `ensemble`): accuracy and f1 where labels exist, seconds per image."""
        metrics: dict[str, float | None] = {"images": images, "unreadable_images": unreadable}
        for name, (accuracy, f1, seconds) in results.items():
            prefix = "" if name == "soup" else f"{name}_"
            metrics |= {
                f"{prefix}accuracy": accuracy,
                f"{prefix}f1": f1,
                f"{prefix}seconds_per_image": seconds,
            }
        self.log_metrics(metrics)

    def register(
        self,
        checkpoint: Path,
        name: str,
        val_accuracy: float,
        split: str,
        lineage: dict | None = None,
        note: str = "",
    ) -> tuple[int, str]:
        """Log the soup as an MLflow model serving images, register it as a version of `name`
        with its lineage (tags: soup run, method, ingredient runs, start, scores) and description,
        and move alias `champion` to it when it beats the champion's val accuracy on the same
        split. Returns the version and what happened to the alias."""
        import soups

        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(Path(soups.__file__).parent / "served_model.py"),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(soups.__file__).parent)],
            registered_model_name=name,
        )
        version = int(info.registered_model_version)
        client = MlflowClient()
        if note:
            client.update_model_version(name, str(version), description=note[:MAX_NOTE_LENGTH])
        for key, value in (lineage or {}).items():
            client.set_model_version_tag(name, str(version), key, str(value)[:MAX_NOTE_LENGTH])
        if not client.get_registered_model(name).description:
            client.update_registered_model(
                name,
                description=f"Model soups made by soups; `models:/{name}@{CHAMPION}` is the best on val.",
            )
        return version, promote(name, version, val_accuracy, split)


@contextmanager
def start(
    role: str,
    experiment: str,
    parent: Run | None = None,
    tags: dict | None = None,
    *,
    name: str = "",
    system_metrics: bool = False,
    experiment_note: str = "",
) -> Iterator[Run]:
    """Attach to the run `mlflow run` created (MLFLOW_RUN_ID), or start one in `experiment`; with
    `parent`, start a child run in the parent's experiment. The run is named `name` unless the
    user named it (`mlflow run --run-name`); with `system_metrics`, MLflow samples CPU, memory and
    GPU use while it runs. An experiment without a description gets `experiment_note`. The run
    ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or when training was stopped early
    (`soups.Stopped`)."""
    configure()
    run_id = None if parent else os.environ.get("MLFLOW_RUN_ID")
    kw = {"log_system_metrics": True} if system_metrics else {}
    if run_id:  # under `mlflow run`: never set_experiment here, it raises
        active = mlflow.start_run(run_id=run_id, **kw)
    elif parent:
        active = mlflow.start_run(
            experiment_id=parent.experiment_id, parent_run_id=parent.id, run_name=name or None, **kw
        )
    else:
        active = mlflow.start_run(experiment_id=experiment_id(experiment), run_name=name or None, **kw)
    try:
        mlflow.set_tags({ROLE: role, **(tags or {})})
        run = Run(active.info.run_id, named_by_user=bool(run_id) and not generated_name(active.info.run_name))
        if name:
            run.rename(name)
        describe_experiment(active.info.experiment_id, experiment_note)
        yield run
    except Stopped as e:
        _end("KILLED", {STOPPED: str(e)})
        raise
    except KeyboardInterrupt:
        _end("KILLED")
        raise
    except BaseException:
        _end("FAILED")
        raise
    mlflow.end_run("FINISHED")


def start_step(role: str, recipe, name: str, parent: Run | None = None, tags: dict | None = None):
    """`start` for a step's run from its recipe: the recipe's experiment, its description for the
    experiment and its choice of system metrics."""
    return start(
        role,
        recipe.experiment,
        parent,
        tags,
        name=name,
        system_metrics=recipe.system_metrics,
        experiment_note=recipe.description,
    )


def describe_experiment(experiment_id: str, note: str) -> None:
    """Give an experiment its description and open it in the UI's model-training view, unless it
    has them already (a description someone wrote is never replaced)."""
    client = MlflowClient()
    tags = client.get_experiment(experiment_id).tags
    if note and not tags.get(NOTE):
        client.set_experiment_tag(experiment_id, NOTE, note)
    if EXPERIMENT_KIND not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")


def generated_name(name: str | None) -> bool:
    """Whether a run name is one MLflow made up (`calm-hound-118`), not one a person gave."""
    if not name:
        return True
    parts = name.split("-")
    if len(parts) != 3 or not parts[2].isdigit():
        return False
    try:
        from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES
    except ImportError:  # the word lists moved: fall back to the shape alone
        return parts[0].isalpha() and parts[1].isalpha()
    return parts[0] in _GENERATOR_PREDICATES and parts[1] in _GENERATOR_NOUNS


def run_link(run_id: str, experiment_id: str, label: str = "") -> str:
    """A Markdown link to a run's page, as the UI resolves it from a description."""
    return f"[{label or run_id[:8]}](#/experiments/{experiment_id}/runs/{run_id})"


def _end(status: str, tags: dict | None = None) -> None:
    """End the active run after a failure, with the tags that say why. When the server cannot be
    reached the run stays RUNNING there (never an ingredient) and the original error is the one
    the user sees."""
    try:
        if tags:
            mlflow.set_tags(tags)
        mlflow.end_run(status)
    except Exception as e:  # the server is gone: say so, do not mask the error that ended the run
        log.warning(
            "could not mark the run %s on %s: %s", status, mlflow.get_tracking_uri(), str(e).splitlines()[0]
        )


class Unreachable(SoupsError):
    """The tracking server did not answer, even after MLflow's own bounded retries."""


@contextmanager
def reachable() -> Iterator[None]:
    """Turn MLflow's "server did not answer" (after its own bounded retries) into `Unreachable`."""
    try:
        yield
    except Exception as e:
        if unreachable(e):
            raise Unreachable(f"tracking server {mlflow.get_tracking_uri()} unreachable") from e
        raise


def unreachable(error: BaseException) -> bool:
    text = str(error)
    markers = (
        "Max retries exceeded",
        "Connection refused",
        "Failed to establish a new connection",
        "Read timed out",
        "RemoteDisconnected",
    )
    return isinstance(error, MlflowException | OSError) and any(m in text for m in markers)


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


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/soups")).expanduser() / "checkpoints"


def cached_checkpoint(run) -> tuple[Path, bool]:
    """The checkpoint of ingredient `run`, downloaded once into the cache by run id and checked
    against the run's sha256 tag. Returns the path and whether it was downloaded now."""
    rid = checked_run_id(run.info.run_id)
    digest = run.data.tags.get(SHA256)
    if not digest:
        raise SoupsError(f"run {rid} has no {SHA256} tag: its checkpoint was never completed")
    dst = cache_root() / rid / Path(CHECKPOINT).name
    if dst.is_file() and sha256(dst) == digest:
        return dst, False
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        try:
            got = Path(MlflowClient().download_artifacts(rid, CHECKPOINT, tmp))
        except (MlflowException, OSError) as e:
            raise SoupsError(
                f"checkpoint of run {rid} cannot be downloaded: {str(e).splitlines()[0]}"
            ) from None
        if (actual := sha256(got)) != digest:
            raise SoupsError(
                f"checkpoint of run {rid} has sha256 {actual[:12]}…, its tag says {digest[:12]}…: "
                "replaced or corrupted after logging"
            )
        os.replace(got, dst)
    return dst, True


def checkpoint_for(uri: str) -> Path:
    """A local soups checkpoint for a model reference: a `.pt` file, `runs:/<id>[/<path>]`,
    `models:/<name>@<alias>` or `models:/<name>/<version>` (the checkpoint of the version's run).
    Run checkpoints come through the sha256-checked cache."""
    if not is_mlflow_uri(uri):
        path = Path(uri).expanduser()
        if path.is_file():
            return path
        raise SoupsError(
            f"model {uri!r} not found: give models:/<name>@<alias>, models:/<name>/<version>, "
            "runs:/<run id> or a checkpoint file"
        )
    configure()
    if uri.startswith("models:/"):
        return cached_checkpoint(get_run(model_version(uri).run_id))[0]
    if uri.startswith("runs:/"):
        rid, _, artifact = uri.removeprefix("runs:/").partition("/")
        if artifact.strip("/") in ("", CHECKPOINT):
            return cached_checkpoint(get_run(rid))[0]
    try:
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="soups-"))
        )
    except (MlflowException, OSError) as e:
        raise SoupsError(f"cannot download {uri}: {str(e).splitlines()[0]}") from None


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


def is_mlflow_uri(value: str) -> bool:
    return value.startswith(("runs:/", "models:/", "mlflow-artifacts:/"))


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
        raise SoupsError(f"experiment {name!r} not found on {mlflow.get_tracking_uri()}")
    return exp.experiment_id


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


def start_of(run) -> str | None:
    return run.data.tags.get(START)


def start_run_of(run) -> str | None:
    return run.data.tags.get(START_RUN)


def newest_start(experiment_id: str, model: str, split: str):
    """The newest finished start run of an experiment for this model and held-out split, or an
    error saying how to make one."""
    clauses = [
        f"tags.`{ROLE}` = 'start'",
        "attributes.status = 'FINISHED'",
        f"params.model = {quote(model)}",
        f"tags.`{SPLIT}` = {quote(split)}",
        f"tags.`{SHA256}` != ''",
    ]
    try:
        runs = MlflowClient().search_runs(
            [experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
        )
    except MlflowException as e:
        raise SoupsError(f"search for start runs failed: {str(e).splitlines()[0]}") from None
    if not runs:
        raise SoupsError(
            f"start=auto: no finished start run for model {model} on split {split} in experiment "
            f"{experiment_name(experiment_id)!r}: run `mlflow run . -e start` first (same recipe), "
            "or pass -P start=none"
        )
    return runs[0]


def quote(value: str) -> str:
    """A string literal for an MLflow search filter. MLflow's filter syntax has no escape for a
    quote inside a literal, so a value holding one is refused rather than let it end the literal
    and change the query."""
    text = str(value)
    if any(c in text for c in "'\"`\\") or any(ord(c) < 32 for c in text):
        raise SoupsError(
            f"{text!r} cannot be searched for: quotes, backslashes and control characters are refused"
        )
    return f"'{text}'"


RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def checked_run_id(run_id: str, what: str = "run id") -> str:
    """A run id as MLflow makes them (hex), never a path or a filter clause in disguise: ids reach
    search filters and the checkpoint cache's paths."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise SoupsError(f"{what} {run_id!r} is not a run id (letters, digits, - and _ only)")
    return run_id


def rank_score(run) -> float | None:
    return run.data.metrics.get(RANK_METRIC)


def parent_filter(parent: str) -> str:
    """The clause that narrows a search to the children of a sweep run."""
    return f"tags.mlflow.parentRunId = {quote(checked_run_id(parent, 'parent'))}" if parent else ""


def get_run(run_id: str):
    checked_run_id(run_id)
    configure()
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as e:
        raise SoupsError(
            f"run {run_id} not found on {mlflow.get_tracking_uri()}: {str(e).splitlines()[0]}"
        ) from None


def has_score(run, split: str) -> bool:
    return f"{split}_accuracy" in run.data.metrics


def log_scores(run_id: str, split: str, scores: dict[str, float]) -> None:
    """Held-out scores into an (already finished) ingredient run, as `<split>_<metric>`."""
    Run(run_id).log_metrics({f"{split}_{k}": v for k, v in scores.items()})


def confusion_figure(run_id: str) -> str:
    return f"confusion/{run_id}.png"


def gallery_figure(run_id: str) -> str:
    return f"mistakes/{run_id}.png"


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


def take_project_run() -> str | None:
    """The run `mlflow run` created for this process, taken out of the environment so that the
    runs this process starts itself (sweep trials) never attach to it."""
    configure()
    return os.environ.pop("MLFLOW_RUN_ID", None)


def experiment_of(run_id: str) -> str:
    return get_run(run_id).info.experiment_id


def experiment_name(experiment_id: str) -> str:
    return MlflowClient().get_experiment(experiment_id).name


def sweep_parent(own_run: str | None, experiment_id: str, study: str, trials: int = 0) -> Run:
    """The sweep's parent run: the run `mlflow run` made for this worker, or a new one."""
    client = MlflowClient()
    name = f"sweep {study}" + (f" {trials} trials" if trials else "")
    run_id = own_run or client.create_run(experiment_id, run_name=name).info.run_id
    run = Run(run_id, named_by_user=not generated_name(client.get_run(run_id).info.run_name))
    run.rename(name)
    run.set_tags({ROLE: "sweep", STUDY: study})
    return run


def mark_sweep_worker(run_id: str, parent_id: str) -> None:
    """Another worker's own `mlflow run` run: labelled, so that nobody takes it for the sweep."""
    Run(run_id).set_tags({ROLE: "sweep-worker", "soups.sweep_parent": parent_id})


def without_password(url: str) -> str:
    """A storage URL fit for a param: the password replaced by *** (all of it: a password may hold
    `@`, `:` or `/`, so the credentials end at the URL's last `@`)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def has_password(url: str) -> bool:
    return without_password(url) != url


def abandon(run_id: str, why: str) -> None:
    """Mark a run whose process is gone FAILED (it never logged a checkpoint), with the reason."""
    client = MlflowClient()
    try:
        if client.get_run(checked_run_id(run_id)).info.status == "RUNNING":
            client.set_tag(run_id, STOPPED, why)
            client.set_terminated(run_id, "FAILED")
    except MlflowException as e:
        log.warning("could not mark run %s FAILED: %s", run_id, str(e).splitlines()[0])


def flag_project_run(why: str) -> str | None:
    """Tag the run `mlflow run` made for this process as holding a secret in its params (MLflow
    cannot take a param back, and `mlflow run` must still end the run); returns its id."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        MlflowClient().set_tag(run_id, "soups.holds_secret", why)
    return run_id
