"""mlflow run . -e infer --env-manager local"""

import click

from entrypoints.common import given, recipe_options, run_cli, step_options, step_values
from soups.recipe import load_recipe
from soups.steps.infer import InferOptions, infer


@click.command(
    help="Predict the test split of the model's data, rebuilt from the run that trained it (mask: the "
    "competition's eval/info.csv + eval/images; --whole_folder: every image under --data, unscored) "
    "with the registered soup, optionally next to an ensemble; write predictions.csv (mask: the "
    "competition's ImageID,ans) into an inference run."
)
@recipe_options("experiment", "data", "layout", "workers", "skip_bad", "registered_model", "max_test")
@step_options(InferOptions)
def main(recipe, **options):
    opts = step_values(InferOptions, options)
    cfg = run_cli(lambda: load_recipe(recipe, given(options)))
    data_options = given({k: options[k] for k in ("data", "layout")})
    out = run_cli(lambda: infer(cfg, opts, data_options))
    skipped = f", {len(out.skipped)} unreadable marked -1" if out.skipped else ""
    click.echo(f"predictions.csv: {out.rows} rows{skipped}" + (f" -> {out.output}" if out.output else ""))
    click.echo(f"predicted {out.what}")
    rows = [(label, acc, None) for label, acc in out.soup_run.items()]
    rows += [(f"{k}: {p.name}", p.accuracy, p.seconds_per_image) for k, p in out.results.items()]
    click.echo(f"{'':<48} {'test accuracy':>14} {'ms / image':>11}")
    for label, acc, spi in rows:
        acc_s = "-" if acc is None else f"{100 * acc:.2f}%"
        spi_s = "" if spi is None else f"{1000 * spi:.2f}"
        click.echo(f"{label[:48]:<48} {acc_s:>14} {spi_s:>11}")
    click.echo(f"inference run {out.run_id}")


if __name__ == "__main__":
    main()
