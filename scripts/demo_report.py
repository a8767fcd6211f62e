"""Print the demo's ingredient runs and where to look at them."""

import click
import pandas as pd

from soups import tracking


@click.command()
@click.option("--experiment", required=True, help="Experiment the demo ran in.")
def main(experiment: str) -> None:
    uri = tracking.configure()
    table = pd.DataFrame(
        tracking.ingredient_table(tracking.ranked_ingredients(tracking.find_experiment(experiment)))
    )
    for col in ("lr", "weight_decay", "label_smoothing"):
        table[col] = pd.to_numeric(table[col])
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 160):
        click.echo(table.to_string(index=False))
    click.echo(f"\nSee the runs: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")


if __name__ == "__main__":
    main()
