"""mlflow run . -e finetune -P i=3 --env-manager local"""

import click

from entrypoints.common import (
    given,
    recipe_options,
    relaunch_if_parallel,
    run_cli,
    step_options,
    step_values,
)
from soups.finetune import TrainingOptions, finetune, resume
from soups.recipe import load_recipe


@click.command(
    help="Fine-tune member I of the recipe's sweep and log it as an ingredient run: params, "
    "per-epoch metrics, val_accuracy and checkpoint/model.pt. Any option overrides the recipe "
    "and the hyperparameters drawn for I."
)
@recipe_options()
@step_options(TrainingOptions)
def main(recipe: str, **overrides) -> None:
    opts = step_values(TrainingOptions, overrides)
    relaunch_if_parallel(opts.nproc)
    if opts.resume:
        run_id = run_cli(lambda: resume(opts.resume, given(overrides)))
    else:
        run_id = run_cli(lambda: finetune(load_recipe(recipe, overrides)))
    if run_id:  # rank 0 (or the only process)
        click.echo(f"ingredient run {run_id}")


if __name__ == "__main__":
    main()
