"""mlflow run . -e evaluate --env-manager local"""

import click
import pandas as pd

from entrypoints.common import given, recipe_options, run_cli, step_options, step_values
from soups.recipe import load_recipe
from soups.steps.evaluate import EvaluateOptions, evaluate_runs


@click.command(
    help="Score ingredient runs on a held-out split: one run (--run_id) or every finished ingredient "
    "run of the experiment that lacks the score. Test scores go into the runs (test_accuracy, test_f1, "
    "...); an evaluation run gets the table, confusion matrices and per-class errors."
)
@recipe_options("experiment", "data", "layout", "workers")
@step_options(EvaluateOptions)
def main(recipe, **options):
    opts = step_values(EvaluateOptions, options)
    cfg = run_cli(lambda: load_recipe(recipe, given(options)))
    data_options = given({k: options[k] for k in ("data", "layout")})
    report = run_cli(lambda: evaluate_runs(cfg, data_options, opts))
    if not report.scores.empty:
        with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
            click.echo(report.scores.to_string(index=False))
    click.echo(f"{report.message}; evaluation run {report.run_id}")


if __name__ == "__main__":
    main()
