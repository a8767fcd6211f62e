"""mlflow run . -e greedy_soup --env-manager local"""

import click

from entrypoints.common import given, method_options, recipe_options, run_cli, step_options, step_values
from soups.options import cli_name
from soups.recipe import load_recipe
from soups.soup import all_params
from soups.steps.soup.step import SoupOptions, make_soup


@click.command(
    help="Average the finished ingredient runs of an experiment into a soup, ranked by val_accuracy "
    "on the tracking server; log it as a soup run and register it (alias champion when it wins). "
    "The held-out split is rebuilt from the top run's params; -P data=... if its data moved."
)
@recipe_options("experiment", "data", "layout", "workers", "registered_model")
@step_options(SoupOptions)
@method_options()
def main(recipe, **options):
    method_params = {cli_name(f): options.pop(f.name) for f in all_params()}
    opts = step_values(SoupOptions, options, method_params=method_params)
    data_options = given({k: options[k] for k in ("data", "layout")})
    cfg = run_cli(lambda: load_recipe(recipe, given(options)))
    report = run_cli(lambda: make_soup(cfg, data_options, opts))
    click.echo(soup_table(report))


def soup_table(report) -> str:
    """The ingredients, then best single and every soup side by side: val, test, ingredients kept."""
    import pandas as pd

    with pd.option_context(
        "display.width", 200, "display.max_colwidth", 60, "display.float_format", "{:.4f}".format
    ):
        lines = [
            "ingredients as trained (val as their runs logged it, test as `evaluate` scored them):",
            report.table.drop(columns=["soup_val_accuracy"]).to_string(index=False),
            "",
        ]
    lines.append(f"every model scored with {report.treatment}; gains on the same test images, 95% interval")
    lines.append(f"{'':<26}{'val':>9}{'test':>9}  {'test gain over best':<34}ingredients")
    best = f"{pct(report.best_val_accuracy)}{pct(report.best_test_accuracy)}  {'':<34}1"
    lines.append(f"{'best ingredient':<26}{best}")
    for dish in report.dishes:
        name = f"{dish.method} soup" + (" (registered)" if dish is report.chosen else "")
        if dish.result is None:
            lines.append(f"{name:<26}{'-':>9}{'-':>9}  not made: {dish.error}")
            continue
        note = (
            f"  (val on the {dish.result.held_out} images it did not rank or fit on; the best ingredient "
            f"there: "
            f"{100 * dish.result.best_accuracy:.2f}%)"
            if dish.result.scored_on is not None
            else ""
        )
        lines.append(
            f"{name:<26}{pct(dish.val_accuracy)}{pct(dish.test_accuracy)}  {gain(dish.test_gain):<34}"
            f"{dish.n_ingredients}{note}"
        )
    lines.append(history_line(report.history))
    kept = f"{report.chosen.n_ingredients} of {report.n_usable} usable ingredients"
    lines.append(
        f"\n{kept} in the {report.method} soup; "
        f"held-out images scored {report.images_scored} (full evaluations of each usable ingredient: "
        f"{report.images_full}), training images forwarded to recompute BatchNorm statistics "
        f"{report.recalibration_images}\n"
        f"soup run {report.run_id}; {report.registry}"
    )
    return "\n".join(lines)


def history_line(h) -> str:
    """Which soup this one continued, what was new and what the reused scores saved."""
    if not h.continued_from:
        return f"\nstarted from scratch: {h.why}"
    line = (
        f"\ncontinued soup run {h.continued_from}: {len(h.new)} of {len(h.considered)} candidate runs new; "
        f"{h.scores_reused} held-out scores answered by its book, {h.models_scored} models scored "
        "(the soup is the one starting over gives; -P from=none starts over)"
    )
    if h.revisited:
        line += (
            f"\n{len(h.revisited)} new run(s) rank above runs the earlier soup considered "
            f"({', '.join(h.revisited[:5])}): the decisions after them were made again"
        )
    return line


def gain(g) -> str:
    """`+0.64 [+0.21, +1.07] p=0.003` in points, `*` when distinguishable from zero."""
    if g is None:
        return "-"
    mark = " *" if g.distinguishable else ""
    return f"{100 * g.gain:+.2f} [{100 * g.low:+.2f}, {100 * g.high:+.2f}] p={g.p_value:.2g}{mark}"


def pct(x: float | None) -> str:
    return f"{'-':>9}" if x is None else f"{100 * x:8.2f}%"


if __name__ == "__main__":
    main()
