"""The Optuna side of a sweep: the recipe's space as distributions, the sampler
that makes trial k draw what `finetune -P i=k` draws, storage with heartbeats (a killed worker's
trial is failed and retried, its run marked FAILED through `tracking`), and the atomic claim that
lets workers share a study."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from soups import SoupsError, tracking
from soups.recipe import draw

log = logging.getLogger(__name__)
RUN_ATTR = "mlflow_run_id"
STORAGE_ENV = "SOUPS_OPTUNA_STORAGE"  # a storage URL with its password, kept out of every param


def distributions(space: dict) -> dict[str, optuna.distributions.BaseDistribution]:
    """The recipe's search space as Optuna distributions (for TPE and for Optuna's plots)."""
    out = {}
    for key, spec in space.items():
        kind, arg = next(iter(spec.items()))
        if kind == "choice":
            out[key] = CategoricalDistribution(list(arg))
        elif kind == "int":
            out[key] = IntDistribution(int(arg[0]), int(arg[1]))
        else:
            out[key] = FloatDistribution(float(arg[0]), float(arg[1]), log=kind == "log_uniform")
    return out


class DrawSampler(optuna.samplers.BaseSampler):
    """Random search with the very draws of `finetune -P i=k`: trial k takes draw(space, k)."""

    def __init__(self, space: dict):
        self.space = space

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return draw(self.space, trial.number)[param_name]


def storage_of(given: str) -> str:
    """The Optuna storage URL: `storage` without a password (libpq takes it from PGPASSWORD or
    ~/.pgpass), else $SOUPS_OPTUNA_STORAGE, else SQLite beside the tracking store. A password in
    `storage` is refused: `mlflow run` records every -P value as a param of the run."""
    if given and tracking.has_password(given):
        flagged = tracking.flag_project_run("its storage param holds a database password")
        where = (
            f"; run {flagged} records it among its params: delete it (mlflow runs delete --run-id "
            f"{flagged}, then mlflow gc)"
            if flagged
            else ""
        )
        raise SoupsError(
            f"storage={tracking.without_password(given)} carries a password, and parameters are recorded "
            f"in MLflow: give the URL without it and the password in PGPASSWORD or ~/.pgpass, or the whole "
            f"URL in ${STORAGE_ENV}{where}"
        )
    return given or os.environ.get(STORAGE_ENV) or default_storage()


def default_storage() -> str:
    uri = tracking.configure()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).with_name('optuna.db')}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def open_storage(url: str, heartbeat_s: int = 60, attempts: int = 6) -> optuna.storages.RDBStorage:
    """Optuna's storage at `url`, with Optuna's heartbeats: a worker records one every
    `heartbeat_s` while it runs a trial, and a trial silent for twice that (its worker was killed)
    is failed by the next worker that looks, its MLflow run marked FAILED, and retried once as a
    new trial with the same hyperparameters. Workers that meet a fresh database at the same time
    race to create its tables (PostgreSQL refuses the loser's duplicate types); the loser tries
    again and finds them made."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=abandon_and_retry,
            )
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == attempts - 1:
                raise SoupsError(
                    f"cannot open Optuna storage {tracking.without_password(url)}: {e}".split("\n")[0]
                ) from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def abandon_and_retry(study: optuna.Study, trial) -> None:
    """A trial whose worker stopped sending heartbeats: its run cannot finish, so say so in MLflow
    (FAILED, with the reason), then queue it again with the same hyperparameters."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    if run_id:
        tracking.abandon(run_id, f"its sweep worker stopped sending heartbeats (trial {trial.number})")
    with settled():
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


@contextmanager
def settled() -> Iterator[None]:
    """Optuna still calls its heartbeat helpers experimental (since 2.8/2.9): quiet that warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def member_index(trial) -> int:
    """The sweep member a trial trains: its own number, or the number of the trial it retries."""
    with settled():
        first = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if first is None else first


@contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, every_s: float) -> Iterator[None]:
    """Record the trial's heartbeat every `every_s` while the body runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial_id}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def open_study(name: str, storage: str, sampler, pruner) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when another worker (or an earlier sweep) did. Returns it and
    whether this worker created it."""
    kw = dict(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    try:
        return optuna.create_study(direction="maximize", **kw), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kw), False


def claim(study: optuna.Study, storage: optuna.storages.BaseStorage) -> optuna.Trial | None:
    """Take one waiting trial for this worker (atomic in the storage), or None when none is left.
    Trials abandoned by a killed worker are failed and queued again first."""
    with settled():
        optuna.storages.fail_stale_trials(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished it meanwhile
    return None


def suggest(trial: optuna.Trial, dists: dict) -> dict:
    return {name: _suggest(trial, name, dist) for name, dist in dists.items()}


def _suggest(trial: optuna.Trial, name: str, dist) -> object:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def wait_for(study: optuna.Study, attr: str, wait_s: float):
    deadline = time.time() + wait_s
    while attr not in study.user_attrs:
        if time.time() > deadline:
            raise SoupsError(
                f"study {study.study_name} has no {attr} after {wait_s:.0f} s: its creator died before "
                "naming the parent run; start again with another -P study="
            )
        time.sleep(0.25)  # a worker that joins late draws its first trial late: keep the wait short
    return study.user_attrs[attr]
