"""mlflow run . -e finetune -P i=3 --env-manager local"""

import click

from entrypoints.common import recipe_options, run_training, step_options
from soups.steps.finetune import TrainingOptions, finetune


@click.command(
    help="Fine-tune member I of the recipe's sweep and log it as an ingredient run: params, "
    "per-epoch metrics, val_accuracy and checkpoint/model.pt. Any option overrides the recipe "
    "and the hyperparameters drawn for I."
)
@recipe_options()
@step_options(TrainingOptions)
def main(recipe: str, **overrides) -> None:
    run_id = run_training(recipe, overrides, finetune)
    if run_id:  # rank 0 (or the only process)
        click.echo(f"ingredient run {run_id}")


if __name__ == "__main__":
    main()
