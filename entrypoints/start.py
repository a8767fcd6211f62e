"""mlflow run . -e start --env-manager local"""

import click

from entrypoints.common import recipe_options, run_training, step_options
from soups.steps.finetune import TrainingOptions, make_start


@click.command(
    help="Train the shared starting weights of a sweep once and log them as a start run "
    "(soups.role=start): start_epochs epochs of member I's draw, every weight (start_mode=finetune) "
    "or the head alone (probe). Members fine-tuned with -P start=auto (or runs:/<this run>) continue "
    "from all of its weights, head included; greedy_soup averages only members of one start."
)
@recipe_options()
@step_options(TrainingOptions)
def main(recipe: str, **overrides) -> None:
    run_id = run_training(recipe, overrides, make_start)
    if run_id:  # rank 0 (or the only process)
        click.echo(
            f"start run {run_id}: fine-tune members from it with -P start=auto or -P start=runs:/{run_id}"
        )


if __name__ == "__main__":
    main()
