"""mlflow run . -e infer --env-manager local"""

import click

from entrypoints.common import given, recipe_options, run_cli
from soups.ensemble import VOTES
from soups.infer_step import TTA, InferOptions, infer
from soups.recipe import load_recipe


@click.command(
    help="Predict the recipe's test images (mask: eval/info.csv + eval/images; Fashion-MNIST: its test "
    "split; image folder: every image under --data) with the registered soup, optionally next to an "
    "ensemble; write predictions.csv (mask: the competition's ImageID,ans) into an inference run."
)
@recipe_options("experiment", "data", "layout", "workers", "skip_bad", "registered_model", "max_test")
@click.option(
    "--model_uri",
    default="",
    help="models:/<name>@<alias>, models:/<name>/<version>, runs:/<id> or a "
    ".pt file [default: models:/<registered_model>@champion].",
)
@click.option(
    "--ensemble",
    default="",
    help="Also predict with an ensemble: comma-separated model URIs, or top:N "
    "for the N best ingredient runs of the experiment.",
)
@click.option(
    "--weights",
    default="",
    help="Ensemble weights: empty for equal, val for each member's val_accuracy, or one number per member.",
)
@click.option(
    "--vote",
    type=click.Choice(list(VOTES)),
    default="soft",
    show_default=True,
    help="soft: mean of probabilities; hard: majority label (ties: best member); attributes: mask "
    "layout, majority per mask / gender / age.",
)
@click.option(
    "--tta",
    type=click.Choice(TTA),
    default="none",
    show_default=True,
    help="Test-time augmentation: hflip averages the probabilities of the image and its mirror.",
)
@click.option(
    "--probs",
    type=bool,
    default=False,
    show_default=True,
    help="Add one probability column per class (not for the mask submission).",
)
@click.option("--output", default="", help="Also write predictions.csv here.")
@click.option(
    "--vote_files",
    default="",
    help="Instead of predicting: hard-vote (or vote=attributes) these "
    "comma-separated predictions.csv files, best first.",
)
def main(recipe, model_uri, ensemble, weights, vote, tta, probs, output, vote_files, **options):
    cfg = run_cli(lambda: load_recipe(recipe, given(options)))
    opts = InferOptions(model_uri, ensemble, weights, vote, tta, probs, output, vote_files)
    out = run_cli(lambda: infer(cfg, opts))
    skipped = f", {len(out['skipped'])} unreadable marked -1" if out["skipped"] else ""
    click.echo(
        f"predictions.csv: {out['rows']} rows{skipped}" + (f" -> {out['output']}" if out["output"] else "")
    )
    rows = [(label, acc, None) for label, acc in out["soup_run"].items()]
    rows += [(f"{k}: {p.name}", p.accuracy, p.seconds_per_image) for k, p in out["results"].items()]
    click.echo(f"{'':<48} {'test accuracy':>14} {'ms / image':>11}")
    for label, acc, spi in rows:
        acc_s = "-" if acc is None else f"{100 * acc:.2f}%"
        spi_s = "" if spi is None else f"{1000 * spi:.2f}"
        click.echo(f"{label[:48]:<48} {acc_s:>14} {spi_s:>11}")
    click.echo(f"inference run {out['run_id']}")


if __name__ == "__main__":
    main()
