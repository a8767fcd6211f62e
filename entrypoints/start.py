"""mlflow run . -e start --env-manager local"""

import click

from entrypoints.common import given, recipe_options, relaunch_if_parallel, run_cli, step_options, step_values
from soups.finetune import TrainingOptions, make_start, resume
from soups.recipe import load_recipe


@click.command(
    help="Train the shared starting weights of a sweep once and log them as a start run "
    "(soups.role=start): start_epochs epochs of member I's draw, every weight (start_mode=finetune) "
    "or the head alone (probe). Members fine-tuned with -P start=auto (or runs:/<this run>) continue "
    "from all of its weights, head included; greedy_soup averages only members of one start."
)
@recipe_options()
@step_options(TrainingOptions)
def main(recipe: str, **overrides) -> None:
    opts = step_values(TrainingOptions, overrides)
    relaunch_if_parallel(opts.nproc)
    if opts.resume:
        run_id = run_cli(lambda: resume(opts.resume, given(overrides)))
    else:
        run_id = run_cli(lambda: make_start(load_recipe(recipe, overrides)))
    if not run_id:  # a rank other than 0
        return
    click.echo(f"start run {run_id}: fine-tune members from it with -P start=auto or -P start=runs:/{run_id}")


if __name__ == "__main__":
    main()
