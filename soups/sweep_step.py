"""The sweep step: an Optuna study whose every trial is an ordinary ingredient run, nested under
one parent run, shared by any number of workers on any number of machines.

Workers agree without talking to each other: the one that creates the study (creation is atomic
in Optuna's storage) creates the parent run and enqueues exactly `trials` trials; every worker
then claims waiting trials one at a time (an atomic WAITING -> RUNNING update in the storage)
until none is left, so together they run exactly the requested number."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from soups import SoupsError, Stopped, tracking
from soups.finetune import finetune
from soups.recipe import Recipe, draw, load_recipe

log = logging.getLogger(__name__)
SAMPLERS = ("random", "tpe")
PRUNERS = ("median", "none")
PARENT_ATTR, EXPERIMENT_ATTR = "mlflow_parent_run_id", "mlflow_experiment_id"
RUN_ATTR = "mlflow_run_id"


@dataclass(frozen=True)
class SweepOptions:
    trials: int = 8
    sampler: str = "random"
    pruner: str = "median"
    study: str = ""  # default: <experiment>-<recipe file stem>
    storage: str = ""  # default: optuna.db beside a SQLite tracking store, else ./optuna.db
    wait_s: float = 300.0  # how long a worker waits for the study's creator to name the parent run


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


def default_storage() -> str:
    uri = tracking.configure()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).with_name('optuna.db')}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def open_storage(url: str, attempts: int = 6) -> optuna.storages.BaseStorage:
    """Optuna's storage at `url`. Workers that meet a fresh database at the same time race to
    create its tables (PostgreSQL refuses the loser's duplicate types); the loser tries again and
    finds them made."""
    for attempt in range(attempts):
        try:
            return optuna.storages.get_storage(url)
        except sqlalchemy.exc.SQLAlchemyError as e:
            if attempt == attempts - 1:
                raise SoupsError(
                    f"cannot open Optuna storage {tracking.without_password(url)}: {e}".split("\n")[0]
                ) from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(name: str, storage: str, sampler, pruner) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when another worker (or an earlier sweep) did. Returns it and
    whether this worker created it."""
    kw = dict(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    try:
        return optuna.create_study(direction="maximize", **kw), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kw), False


def claim(study: optuna.Study, storage: optuna.storages.BaseStorage) -> optuna.Trial | None:
    """Take one waiting trial for this worker (atomic in the storage), or None when none is left."""
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
    recipe = load_recipe(recipe_path, {**params, **given, "i": trial.number, "experiment": experiment})

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
    storage_url = opts.storage or default_storage()
    storage = open_storage(storage_url)
    sampler = DrawSampler(space) if opts.sampler == "random" else optuna.samplers.TPESampler(seed=recipe.seed)
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
        parent = tracking.sweep_parent(own_run, experiment_id, name)
        parent.log_params(
            {
                "trials": opts.trials,
                "sampler": opts.sampler,
                "pruner": opts.pruner,
                "study": name,
                "storage": tracking.without_password(storage_url),
            }
        )
        for _ in range(opts.trials):
            study.enqueue_trial({})
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
        study.set_user_attr(PARENT_ATTR, parent.id)  # last: workers wait for this one
    else:
        parent = tracking.Run(_wait_for(study, PARENT_ATTR, opts.wait_s))
        experiment_id = study.user_attrs[EXPERIMENT_ATTR]
        if own_run:
            tracking.mark_sweep_worker(own_run, parent.id)
    experiment = tracking.experiment_name(experiment_id)
    done = 0
    while (trial := claim(study, storage)) is not None:
        log.info("trial %d of study %s", trial.number, name)
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
