"""mlflow run . -e sweep -P trials=8 --env-manager local"""

import click

from entrypoints.common import given, recipe_options, run_cli
from soups.recipe import load_recipe
from soups.sweep_step import PRUNERS, SAMPLERS, SweepOptions, sweep


@click.command(
    help="Fine-tune the recipe's search space as an Optuna study: one parent run (soups.role=sweep) and "
    "one nested ingredient run per trial. Start the same command on several processes or machines "
    "(same study, storage and MLFLOW_TRACKING_URI) and they share the trials. Any recipe option "
    "given here is fixed for every trial."
)
@recipe_options()
@click.option(
    "--trials", type=int, default=8, show_default=True, help="Trials in the study, all workers together."
)
@click.option(
    "--sampler",
    type=click.Choice(SAMPLERS),
    default="random",
    show_default=True,
    help="random: trial k draws what finetune -P i=k draws (the paper's random search); tpe: Optuna's TPE.",
)
@click.option(
    "--pruner",
    type=click.Choice(PRUNERS),
    default="median",
    show_default=True,
    help="median: stop a trial whose val_accuracy after an epoch is below the median of earlier "
    "trials at that epoch (its run ends KILLED, tag soups.stopped, no checkpoint).",
)
@click.option(
    "--study",
    default="",
    help="Optuna study name [default: <experiment>-<recipe file name>]; the same name resumes the study.",
)
@click.option(
    "--storage",
    default="",
    help="Optuna storage URL without a password, e.g. postgresql+psycopg2://user@host/db (the "
    "password comes from PGPASSWORD or ~/.pgpass; MLflow records every -P value, so a URL holding "
    "a password is refused) [default: $SOUPS_OPTUNA_STORAGE, else optuna.db beside a SQLite "
    "tracking store].",
)
@click.option(
    "--heartbeat",
    type=int,
    default=60,
    show_default=True,
    help="Seconds between a worker's heartbeats; a trial silent for twice that (its worker was killed) "
    "is failed, its run marked FAILED, and retried once by the next worker.",
)
def main(recipe, trials, sampler, pruner, study, storage, heartbeat, **options):
    fixed = given(options)
    cfg = run_cli(lambda: load_recipe(recipe, fixed))
    opts = SweepOptions(trials, sampler, pruner, study, storage, heartbeat_s=heartbeat)
    out = run_cli(lambda: sweep(recipe, cfg, fixed, opts))
    click.echo(
        f"study {out['study']}: this worker ran {out['ran']} trial(s); the study has {out['total']} "
        f"({out['complete']} complete, {out['pruned']} pruned)\n"
        f"parent run {out['parent']}; soup its children with: "
        f"mlflow run . -e greedy_soup -P parent={out['parent']} --env-manager local"
    )


if __name__ == "__main__":
    main()
