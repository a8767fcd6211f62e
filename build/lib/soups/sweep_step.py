"""The sweep step: an Optuna study whose every trial is an ordinary ingredient run, nested under
one parent run, shared by any number of workers on any number of machines.

Workers agree without talking to each other: the one that creates the study (creation is atomic
in Optuna's storage) creates the parent run and enqueues exactly `trials` trials; every worker
then claims waiting trials one at a time (an atomic WAITING -> RUNNING update in the storage)
until none is left, so together they run exactly the requested number."""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from soups import SoupsError, Stopped, data, tracking
from soups.finetune import finetune
from soups.recipe import Recipe, draw, load_recipe

log = logging.getLogger(__name__)
SAMPLERS = ("random", "tpe")
PRUNERS = ("median", "none")
PARENT_ATTR, EXPERIMENT_ATTR = "mlflow_parent_run_id", "mlflow_experiment_id"
START_ATTR = "soups_start"  # the start every trial loads, resolved once by the study's creator
RUN_ATTR = "mlflow_run_id"
STORAGE_ENV = "SOUPS_OPTUNA_STORAGE"  # a storage URL with its password, kept out of every param


@dataclass(frozen=True)
class SweepOptions:
    trials: int = 8
    sampler: str = "random"
    pruner: str = "median"
    study: str = ""  # default: <experiment>-<recipe file stem>
    storage: str = ""  # default: optuna.db beside a SQLite tracking store, else ./optuna.db
    wait_s: float = 300.0  # how long a worker waits for the study's creator to name the parent run
    heartbeat_s: int = 60  # a trial silent for twice this long (its worker died) is failed and retried


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


def _wait_for(study: optuna.Study, attr: str, wait_s: float):
    deadline = time.time() + wait_s
    while attr not in study.user_attrs:
        if time.time() > deadline:
            raise SoupsError(
                f"study {study.study_name} has no {attr} after {wait_s:.0f} s: its creator died before "
                "naming the parent run; start again with another -P study="
            )
        time.sleep(1.0)
    return study.user_attrs[attr]


def run_trial(study, trial, recipe_path, given: dict, dists: dict, parent, experiment: str) -> None:
    """One trial = one ordinary ingredient run nested under the sweep's parent run."""
    params = suggest(trial, dists)
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    i = member_index(frozen)  # a retried trial trains the member its first attempt drew
    recipe = load_recipe(recipe_path, {**params, **given, "i": i, "experiment": experiment})

    def prune(epoch: int, metrics: dict[str, float]) -> None:
        trial.report(metrics[tracking.RANK_METRIC], epoch)
        if epoch < recipe.epochs and trial.should_prune():
            raise Stopped(f"pruned by Optuna after epoch {epoch}")

    tags = {tracking.TRIAL: trial.number, tracking.STUDY: study.study_name}
    try:
        run_id = finetune(
            recipe, parent, tags, prune, on_start=lambda rid: trial.set_user_attr(RUN_ATTR, rid)
        )
    except Stopped:
        study.tell(trial, state=TrialState.PRUNED)
        return
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    value = tracking.rank_score(tracking.get_run(run_id))
    study.tell(trial, value)


def sweep(recipe_path: str, recipe: Recipe, given: dict, opts: SweepOptions) -> dict:
    """Run this worker's share of the study's trials; the last worker to finish writes the study's
    summary into the parent run. Returns what to print."""
    if opts.sampler not in SAMPLERS:
        raise SoupsError(f"sampler={opts.sampler!r} must be one of {', '.join(SAMPLERS)}")
    if opts.pruner not in PRUNERS:
        raise SoupsError(f"pruner={opts.pruner!r} must be one of {', '.join(PRUNERS)}")
    if opts.trials < 1:
        raise SoupsError(f"trials={opts.trials} must be >= 1")
    space = {k: v for k, v in recipe.space.items() if k not in given}  # explicit values stay fixed
    if not space:
        raise SoupsError(f"recipe {recipe_path} has no search space left to sweep (`space:` in the YAML)")
    dists = distributions(space)
    name = opts.study or f"{recipe.experiment}-{Path(recipe_path).stem}"
    storage_url = storage_of(opts.storage)
    storage = open_storage(storage_url, opts.heartbeat_s)
    # TPE unseeded: workers seeded alike would make the same start-up draws; constant_liar keeps
    # workers from proposing what another one is trying right now.
    sampler = (
        DrawSampler(space)
        if opts.sampler == "random"
        else optuna.samplers.TPESampler(seed=None, constant_liar=True)
    )
    pruner = (
        optuna.pruners.MedianPruner(n_warmup_steps=1)
        if opts.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    own_run = tracking.take_project_run()  # the run `mlflow run` made for this worker, if any
    study, created = open_study(name, storage, sampler, pruner)
    if created:
        experiment_id = (
            tracking.experiment_of(own_run) if own_run else tracking.experiment_id(recipe.experiment)
        )
        parent = tracking.sweep_parent(own_run, experiment_id, name, opts.trials)
        parent.log_params(
            {
                "trials": opts.trials,
                "sampler": opts.sampler,
                "pruner": opts.pruner,
                "study": name,
                "storage": tracking.without_password(storage_url),
            }
        )
        start = sweep_start(recipe, experiment_id)
        parent.log_params({"start": start})
        for _ in range(opts.trials):
            study.enqueue_trial({})
        study.set_user_attr(START_ATTR, start)
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
        study.set_user_attr(PARENT_ATTR, parent.id)  # last: workers wait for this one
    else:
        parent = tracking.Run(_wait_for(study, PARENT_ATTR, opts.wait_s))
        experiment_id = study.user_attrs[EXPERIMENT_ATTR]
        start = study.user_attrs.get(START_ATTR, recipe.start)
        if own_run:
            tracking.mark_sweep_worker(own_run, parent.id)
    given = {**given, "start": start}
    experiment = tracking.experiment_name(experiment_id)
    done = 0
    while (trial := claim(study, storage)) is not None:
        log.info("trial %d of study %s", trial.number, name)
        with heartbeat(storage, trial._trial_id, opts.heartbeat_s):
            run_trial(study, trial, recipe_path, given, dists, parent, experiment)
        done += 1
    states = [t.state for t in study.get_trials(deepcopy=False)]
    if not any(s in (TrialState.WAITING, TrialState.RUNNING) for s in states):
        summarise(study, parent)  # every worker that sees the study complete does it: idempotent
    return {
        "study": name,
        "parent": parent.id,
        "ran": done,
        "created": created,
        "complete": sum(s == TrialState.COMPLETE for s in states),
        "pruned": sum(s == TrialState.PRUNED for s in states),
        "total": len(states),
    }


def sweep_start(recipe: Recipe, experiment_id: str) -> str:
    """The start every trial of the sweep loads: `auto` resolved once, here, to the newest matching
    start run, so that a start made while the sweep runs never splits its trials in two."""
    if recipe.start != "auto":
        return recipe.start
    found = tracking.newest_start(experiment_id, recipe.model, data.load_splits(recipe).fingerprint)
    return f"runs:/{found.info.run_id}"


def summarise(study: optuna.Study, parent: tracking.Run) -> None:
    """The best trial and Optuna's plots into the parent run, which then ends FINISHED."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        parent.log_metrics({"best_val_accuracy": best.value, "best_trial": best.number})
        parent.set_tags(
            {
                "best_trial_run_id": best.user_attrs.get(RUN_ATTR, ""),
                **{f"best.{k}": v for k, v in best.params.items()},
            }
        )
    plots = {
        "optimization_history.html": optuna.visualization.plot_optimization_history,
        "param_importances.html": optuna.visualization.plot_param_importances,
        "parallel_coordinate.html": optuna.visualization.plot_parallel_coordinate,
    }
    for file, plot in plots.items():
        try:
            parent.log_text(plot(study).to_html(include_plotlyjs=True), f"optuna/{file}")
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials for the plot
            log.info("no %s: %s", file, e)
    parent.finish()
