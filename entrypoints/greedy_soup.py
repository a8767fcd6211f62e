"""mlflow run . -e greedy_soup --env-manager local"""

import click
import pandas as pd

from entrypoints.common import given, recipe_options, run_cli
from soups.recipe import load_recipe
from soups.soup import SOUP_METHODS, TIE_RULES
from soups.soup_step import BN_MODES, SoupOptions, make_soup


@click.command(
    help="Average the finished ingredient runs of an experiment into a soup, ranked by val_accuracy "
    "on the tracking server; log it as a soup run and register it (alias champion when it wins). "
    "The held-out split is rebuilt from the top run's params; -P data=... if its data moved."
)
@recipe_options("experiment", "data", "layout", "workers", "registered_model")
@click.option(
    "--method",
    type=click.Choice(list(SOUP_METHODS)),
    default="greedy",
    show_default=True,
    help="greedy: add ingredients in rank order while val accuracy does not drop; uniform: average all.",
)
@click.option(
    "--tie",
    type=click.Choice(list(TIE_RULES)),
    default="ge",
    show_default=True,
    help="ge: keep an ingredient when the soup is not worse (the paper's rule); strict: only when better.",
)
@click.option(
    "--bn_recalibrate",
    type=click.Choice(BN_MODES),
    default="auto",
    show_default=True,
    help="Recompute BatchNorm statistics of averaged weights on training images "
    "(auto: when the model has BatchNorm).",
)
@click.option(
    "--bn_images",
    type=int,
    default=1000,
    show_default=True,
    help="Training images used to recompute BatchNorm statistics (0: all).",
)
@click.option(
    "--max_candidates",
    type=int,
    default=0,
    show_default=True,
    help="Consider at most this many top-ranked runs (0: all).",
)
@click.option(
    "--filter", "filter_", default="", help="Extra MLflow search clause, e.g. \"params.model = 'x'\"."
)
@click.option("--parent", default="", help="Only the child runs of this (sweep) run id.")
@click.option(
    "--source", default="", help="Experiment to take ingredients from (default: the soup run's own)."
)
def main(recipe, method, tie, bn_recalibrate, bn_images, max_candidates, filter_, parent, source, **options):
    opts = SoupOptions(method, tie, bn_recalibrate, bn_images, max_candidates, filter_, parent, source)
    data_options = given({k: options[k] for k in ("data", "layout")})
    cfg = run_cli(lambda: load_recipe(recipe, given(options)))
    report = run_cli(lambda: make_soup(cfg, data_options, opts))
    with pd.option_context(
        "display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.4f}".format
    ):
        click.echo(report.table.drop(columns=["soup_val_accuracy"]).to_string(index=False))
    rows = [
        ("best ingredient", report.best_val_accuracy, report.best_test_accuracy),
        ("uniform soup", report.uniform_val_accuracy, report.uniform_test_accuracy),
        (f"{method} soup", report.val_accuracy, report.test_accuracy),
    ]
    click.echo("\n" + "\n".join(f"{name:<16} val {pct(v)}  test {pct(t)}" for name, v, t in rows))
    click.echo(
        f"{report.n_ingredients} of {report.n_usable} usable ingredients in the soup; held-out images "
        f"scored {report.images_scored} of {report.images_full} for full evaluations\n"
        f"soup run {report.run_id}; {report.registry}"
    )


def pct(x: float | None) -> str:
    return "   -   " if x is None else f"{100 * x:6.2f}%"


if __name__ == "__main__":
    main()
