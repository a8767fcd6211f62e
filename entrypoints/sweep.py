"""mlflow run . -e sweep -P trials=8 --env-manager local"""

import click

from entrypoints.common import given, recipe_options, run_cli, step_options, step_values
from soups.recipe import load_recipe
from soups.steps.finetune import finetune, make_start
from soups.steps.soup.step import soup_for_sweep
from soups.steps.sweep.step import Steps, SweepOptions, sweep

STEPS = Steps(finetune, make_start, soup_for_sweep)  # what a sweep trains and soups with


@click.command(
    help="Fine-tune the recipe's search space as an Optuna study: one parent run (soups.role=sweep) and "
    "one nested ingredient run per trial. Start the same command on several processes or machines "
    "(same study, storage and MLFLOW_TRACKING_URI) and they share the trials. Any recipe option "
    "given here is fixed for every trial."
)
@recipe_options()
@step_options(SweepOptions)
def main(recipe, **options):
    opts = step_values(SweepOptions, options)
    fixed = given(options)
    cfg = run_cli(lambda: load_recipe(recipe, fixed))
    out = run_cli(lambda: sweep(recipe, cfg, fixed, opts, STEPS))
    click.echo(
        f"study {out.study}: this worker ran {out.ran} trial(s); the study has {out.total} "
        f"({out.complete} complete, {out.pruned} pruned)\n"
        f"parent run {out.parent}; its trials are souped as -P soup= says (default: at the end); "
        f"again by hand: mlflow run . -e greedy_soup -P parent={out.parent} --env-manager local"
    )


if __name__ == "__main__":
    main()
