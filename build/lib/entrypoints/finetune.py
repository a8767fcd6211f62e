"""mlflow run . -e finetune -P i=3 --env-manager local"""

import click

from entrypoints.common import recipe_options, run_cli
from soups.finetune import finetune
from soups.recipe import load_recipe


@click.command(
    help="Fine-tune member I of the recipe's sweep and log it as an ingredient run: params, "
    "per-epoch metrics, val_accuracy and checkpoint/model.pt. Any option overrides the recipe "
    "and the hyperparameters drawn for I."
)
@recipe_options()
def main(recipe: str, **overrides) -> None:
    run_id = run_cli(lambda: finetune(load_recipe(recipe, overrides)))
    click.echo(f"ingredient run {run_id}")


if __name__ == "__main__":
    main()
