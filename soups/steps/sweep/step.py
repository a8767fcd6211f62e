"""The sweep step: an Optuna study whose every trial is an ordinary ingredient run, nested under
one parent run, shared by any number of workers on any number of machines.

Workers agree without talking to each other: the one that creates the study (creation is atomic
in Optuna's storage) creates the parent run and enqueues exactly `trials` trials; every worker
then claims waiting trials one at a time (an atomic WAITING -> RUNNING update in the storage)
until none is left, so together they run exactly the requested number."""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import optuna
from optuna.trial import TrialState

from soups import SoupsError, Stopped, options, tracking
from soups.options import checked, option
from soups.recipe import Recipe, load_recipe, load_splits
from soups.starts import auto_start, start_recipe
from soups.steps.sweep.souping import SoupJob, due, finish, request, soup_every
from soups.steps.sweep.study import (
    RUN_ATTR,
    DrawSampler,
    claim,
    distributions,
    heartbeat,
    member_index,
    open_storage,
    open_study,
    storage_of,
    suggest,
    wait_for,
)

log = logging.getLogger(__name__)
SAMPLERS = ("random", "tpe")
PRUNERS = ("median", "none")
PARENT_ATTR, EXPERIMENT_ATTR = "mlflow_parent_run_id", "mlflow_experiment_id"
START_ATTR = "soups_start"  # the start every trial loads, resolved once by the study's creator


@dataclass(frozen=True)
class SweepOptions:
    trials: int = option(8, "Trials in the study, all workers together.")
    sampler: str = option(
        "random",
        "random: trial k draws what finetune -P i=k draws (the paper's random search); tpe: Optuna's TPE.",
        choices=SAMPLERS,
    )
    pruner: str = option(
        "median",
        "median: stop a trial whose val_accuracy after an epoch is below the median of earlier "
        "trials at that epoch (its run ends KILLED, tag soups.stopped, no checkpoint).",
        choices=PRUNERS,
    )
    study: str = option(
        "", "Optuna study name [default: <experiment>-<recipe file name>]; the same name resumes the study."
    )
    storage: str = option(
        "",
        "Optuna storage URL without a password, e.g. postgresql+psycopg2://user@host/db (the "
        "password comes from PGPASSWORD or ~/.pgpass; MLflow records every -P value, so a URL holding "
        "a password is refused) [default: $SOUPS_OPTUNA_STORAGE, else optuna.db beside a SQLite "
        "tracking store].",
    )
    heartbeat: int = option(
        60,
        "Seconds between a worker's heartbeats; a trial silent for twice that (its worker was killed) "
        "is failed, its run marked FAILED, and retried once by the next worker.",
    )
    soup: str = option(
        "end",
        "Soup the sweep's trials into the registered model: end (when the last trial finishes), "
        "every:K (also after every K completed, not pruned, trials: the champion follows the sweep; "
        "one worker soups at a time, in the background, and each soup continues the previous one), "
        "none.",
    )
    wait_s: float = 300.0  # how long a worker waits for the study's creator to name the parent run


@dataclass(frozen=True)
class Steps:
    """The steps a sweep drives, handed in by its entry point (steps never import one another)."""

    finetune: Callable[..., str]  # finetune(recipe, parent, tags, on_epoch, on_start, resume) -> run id
    make_start: Callable[[Recipe, str], str]  # (recipe, the start run claimed for it) -> its run id
    # soup(recipe, data options, parent run, continue_from) -> (soup run id, a line to log); a
    # module-level function: it crosses into the background soup's process
    soup: Callable[[Recipe, dict, str, str], tuple[str, str]]


@dataclass(frozen=True)
class SweepResult:
    """What this worker did, and where the study stands."""

    study: str
    parent: str
    ran: int
    created: bool
    complete: int
    pruned: int
    total: int


def run_trial(
    study, trial, recipe_path, given: dict, dists: dict, parent, experiment: str, finetune: Callable[..., str]
) -> None:
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
    resume = resumable_attempt(study, frozen)
    try:
        run_id = finetune(recipe, parent, tags, prune, lambda rid: trial.set_user_attr(RUN_ATTR, rid), resume)
    except Stopped:
        study.tell(trial, state=TrialState.PRUNED)
        return
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    value = tracking.rank_score(tracking.get_run(run_id))
    study.tell(trial, value)


def resumable_attempt(study: optuna.Study, trial) -> str:
    """A retried trial (its worker was killed) continues its first attempt's run in place when that
    run kept a training state (save_every); otherwise it trains from the start again."""
    first = member_index(trial)
    if first == trial.number:
        return ""
    earlier = next(t for t in study.get_trials(deepcopy=False) if t.number == first)
    run_id = earlier.user_attrs.get(RUN_ATTR, "")
    try:
        return tracking.resumable(run_id).info.run_id if run_id else ""
    except SoupsError as e:
        log.info("trial %d trains again from the start: %s", trial.number, e)
        return ""


def sweep(recipe_path: str, recipe: Recipe, given: dict, opts: SweepOptions, steps: Steps) -> SweepResult:
    """Run this worker's share of the study's trials; the last worker to finish writes the study's
    summary into the parent run. Returns what to print."""
    checked(opts)
    every = soup_every(opts.soup)
    if every is not None:
        picklable(steps.soup)
    if opts.trials < 1:
        raise SoupsError(f"trials={opts.trials} must be >= 1")
    space = {k: v for k, v in recipe.space.items() if k not in given}  # explicit values stay fixed
    if not space:
        raise SoupsError(f"recipe {recipe_path} has no search space left to sweep (`space:` in the YAML)")
    name = opts.study or f"{recipe.experiment}-{Path(recipe_path).stem}"
    storage_url = storage_of(opts.storage)
    storage = open_storage(storage_url, opts.heartbeat)
    own_run = tracking.take_project_run()  # the run `mlflow run` made for this worker, if any
    study, created = open_study(name, storage, sampler_for(opts.sampler, space), pruner_for(opts.pruner))
    if created:
        opts = dataclasses.replace(opts, study=name, storage=tracking.without_password(storage_url))
        experiment_id = (
            tracking.experiment_of_run(own_run) if own_run else tracking.ensure_experiment(recipe.experiment)
        )
        study.set_user_attr(EXPERIMENT_ATTR, experiment_id)  # first: joining workers find the start there
        start = sweep_start(recipe, experiment_id, steps.make_start)
        parent = create_parent(study, opts, own_run, experiment_id, start)
    else:
        experiment_id = wait_for(study, EXPERIMENT_ATTR, opts.wait_s)
        # While the creator trains the start, wait on that start run (its heartbeat says it is
        # alive), not on a timer that takes a long start for a dead creator.
        if START_ATTR not in study.user_attrs:
            sweep_start(recipe, experiment_id, steps.make_start)
        parent = tracking.Run(wait_for(study, PARENT_ATTR, opts.wait_s))
        start = study.user_attrs.get(START_ATTR, recipe.start)
        if own_run:
            tracking.mark_sweep_worker(own_run, parent.id)
    given = {**given, "start": start}
    experiment = tracking.experiment_name(experiment_id)
    dists, done, soups = distributions(space), 0, []
    job = SoupJob(
        storage_url, name, partial(sweep_soup, steps.soup, recipe_path, given, parent.id, experiment)
    )
    while (trial := claim(study, storage)) is not None:
        log.info("trial %d of study %s", trial.number, name)
        with heartbeat(storage, trial._trial_id, opts.heartbeat):
            run_trial(study, trial, recipe_path, given, dists, parent, experiment, steps.finetune)
        done += 1
        if every and (covers := due(study, every, ended=False)):
            request(study, storage, job, covers, soups)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    ended = not any(s in (TrialState.WAITING, TrialState.RUNNING) for s in states)
    if ended:
        summarise(study, parent)  # every worker that sees the study complete does it: idempotent
        if done and (covers := due(study, every, ended=True)):
            request(study, storage, job, covers, soups)
    finish(study, storage, job, soups, ended and bool(done))  # this worker ends when its soups have
    count = lambda state: sum(s == state for s in states)  # noqa: E731
    return SweepResult(
        name, parent.id, done, created, count(TrialState.COMPLETE), count(TrialState.PRUNED), len(states)
    )


def picklable(soup) -> None:
    """The soup step crosses into the background soup's process: refuse it now, not after a trial."""
    try:
        pickle.dumps(soup)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise SoupsError(f"the sweep's soup step must be a module-level function: {e}") from None


def sweep_soup(soup, recipe_path: str, given: dict, parent: str, experiment: str, continue_from: str):
    """One soup of the sweep's completed trials, continuing `continue_from` (the background
    process of `souping` runs it). Returns the soup run id and a line to log."""
    recipe = load_recipe(recipe_path, {**given, "experiment": experiment})
    return soup(recipe, {k: given[k] for k in ("data", "layout") if k in given}, parent, continue_from)


def sampler_for(name: str, space: dict) -> optuna.samplers.BaseSampler:
    # TPE unseeded: workers seeded alike would make the same start-up draws; constant_liar keeps
    # workers from proposing what another one is trying right now.
    if name == "random":
        return DrawSampler(space)
    return optuna.samplers.TPESampler(seed=None, constant_liar=True)


def pruner_for(name: str) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_warmup_steps=1) if name == "median" else optuna.pruners.NopPruner()


def create_parent(
    study: optuna.Study, opts: SweepOptions, own_run: str | None, experiment_id: str, start: str
) -> tracking.Run:
    """The study's creator: the parent run, the start every trial loads, and the trials enqueued."""
    parent = tracking.sweep_parent(own_run, experiment_id, opts.study, opts.trials)
    tracking.log_sweep_setup(parent, options.params(opts), start)
    for _ in range(opts.trials):
        study.enqueue_trial({})
    study.set_user_attr(START_ATTR, start)
    study.set_user_attr(PARENT_ATTR, parent.id)  # last: workers wait for this one
    return parent


def sweep_start(recipe: Recipe, experiment_id: str, make_start: Callable[[Recipe, str], str]) -> str:
    """The start every trial of the sweep loads: `auto` resolved once, here, to the newest matching
    start run (trained now when there is none), so that a start made while the sweep runs never
    splits its trials in two."""
    if recipe.start != "auto":
        return recipe.start
    split = load_splits(recipe).fingerprint
    return auto_start(recipe, split, experiment_id, partial(make_start, start_recipe(recipe)))


def summarise(study: optuna.Study, parent: tracking.Run) -> None:
    """The best trial and Optuna's plots into the parent run, which then ends FINISHED."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if completed:
        best = study.best_trial
        tracking.log_sweep_best(
            parent, best.value, best.number, best.user_attrs.get(RUN_ATTR, ""), best.params
        )
    plots = {
        "optimization_history": optuna.visualization.plot_optimization_history,
        "param_importances": optuna.visualization.plot_param_importances,
        "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
    }
    for file, plot in plots.items():
        try:
            tracking.log_sweep_plot(parent, file, plot(study).to_html(include_plotlyjs=True))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # too few trials for the plot
            log.info("no %s: %s", file, e)
    parent.finish()
