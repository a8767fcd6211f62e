"""What a soup run shows: its name, its Markdown description, the curve and val-vs-test
figures, and the checkpoint registered with its lineage."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from soups import plots, tracking
from soups.models import Checkpoint, save_checkpoint
from soups.soup import METHODS
from soups.steps.soup.ingredients import Gathered
from soups.steps.soup.report import BASELINE, SoupReport

log = logging.getLogger(__name__)


def soup_name(report: SoupReport) -> str:
    """`greedy soup 2/4 (+0.40 val)`: method, ingredients kept of usable, val gain in points."""
    chosen = report.chosen
    gain = 100 * chosen.result.val_gain
    return f"{report.method} soup {chosen.n_ingredients}/{report.n_usable} ({gain:+.2f} val)"


def soup_note(report: SoupReport, g: Gathered, experiment_id: str) -> str:
    """The soup run's description: method, start, each ingredient with its link, score and the
    decision, and the result beside the best ingredient and the other methods."""
    method_ = METHODS[report.method]
    start_run = tracking.start_run_of(g.top)
    start = (
        tracking.run_link(start_run, experiment_id, f"start run {start_run[:8]}")
        if start_run
        else f"the pretrained weights (`{g.ref.pretrained}`)"
    )
    rows = [
        f"| {row['rank']} | {tracking.run_link(row['run_id'], g.top.info.experiment_id)}"
        f"{' (new)' if row.get('new') and report.history.continued_from else ''} | {row['i']} | "
        f"{pct(row['val_accuracy'])} | {pct(row['soup_val_accuracy'])} | {row['status']} | {row['reason']} |"
        for row in report.table.to_dict("records")
    ]
    others = [
        f"| {d.method} | {val_cell(d)} | {pct(d.test_accuracy)} | "
        f"{d.test_gain.describe() if d.test_gain else '-'} | {d.n_ingredients} |"
        for d in report.dishes
    ]
    verdict = (
        f"On test, the {report.method} soup's gain over the best ingredient is "
        f"{report.chosen.test_gain.describe()}."
        if report.chosen.test_gain
        else "No test split: no test gain."
    )
    return "\n".join(
        [
            f"**{report.method} soup** ({method_.paper}) of {report.n_usable} usable ingredients, "
            f"{report.chosen.n_ingredients} kept; they started from {start}, weights "
            f"`{(tracking.start_of(g.top) or '?')[:12]}`; split `{g.splits.fingerprint}`.",
            "",
            history_note(report, experiment_id),
            "",
            "| rank | run | i | val | soup val after it | decision | why |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"Best ingredient, scored as the soups are ({report.treatment}): val "
            f"{pct(report.best_val_accuracy)}, test {pct(report.best_test_accuracy)} (val as trained "
            f"{pct(report.best.logged_val_accuracy)}).",
            "",
            verdict,
            "",
            "| method | val | test | test gain over the best ingredient | ingredients |",
            "| --- | --- | --- | --- | --- |",
            *others,
        ]
    )


def val_cell(dish, best_val: float | None = None) -> str:
    """A soup's val accuracy (beside `best_val`, the best ingredient's on all of val, when given);
    for a method that ranks or fits on part of val, on the images it did not use for that, beside
    the best ingredient on those same images."""
    r = dish.result
    if r is None or r.scored_on is None:
        return pct(dish.val_accuracy) + ("" if best_val is None else f" (best ingredient {pct(best_val)})")
    return f"{pct(r.accuracy)} on {r.held_out} images (best ingredient there {pct(r.best_accuracy)})"


def pct(x) -> str:
    return "-" if x is None or pd.isna(x) else f"{100 * x:.2f}%"


def history_note(report: SoupReport, experiment_id: str) -> str:
    """What this soup reused and what is new, for its description and the step's output."""
    h = report.history
    if h is None:
        return ""
    if not h.continued_from:
        return f"Started from scratch ({h.why}): all {len(h.considered)} candidate runs considered."
    saved = f"{h.scores_reused} held-out scores answered by the book, {h.models_scored} models scored"
    link = tracking.run_link(h.continued_from, experiment_id, f"soup run {h.continued_from[:8]}")
    text = (
        f"Continued {link}: {len(h.new)} of {len(h.considered)} candidate runs are new ("
        + (", ".join(r[:8] for r in h.new[:10]) + (" …" if len(h.new) > 10 else "") or "none")
        + f"); {saved}. The result is what starting over gives (`-P from=none`)."
    )
    if h.revisited:
        text += (
            f" {len(h.revisited)} new run(s) rank above runs the earlier soup considered "
            f"({', '.join(r[:8] for r in h.revisited[:5])}): the decisions after them were made again."
        )
    text += (
        " (A method that ranks on part of val, as the default greedy rule does, can place new runs "
        "above earlier ones there too; the models scored say what was made again.)"
    )
    return text


def lineage_of(report: SoupReport, g: Gathered, run_id: str) -> tracking.Lineage:
    chosen, h = report.chosen, report.history
    return tracking.Lineage(
        soup_run=run_id,
        method=report.method,
        ingredients=list(chosen.result.ingredients),
        start=tracking.start_of(g.top) or "",
        start_run=tracking.start_run_of(g.top) or "",
        split=g.splits.fingerprint,
        val_accuracy=chosen.val_accuracy,
        test_accuracy=chosen.test_accuracy,
        considered=h.considered,
        new=h.new,
        continued_from=h.continued_from,
    )


def publish(run, report: SoupReport, g: Gathered, meta: Checkpoint, judge, name: str, book: dict) -> None:
    run.log_soup(report)
    run.log_soup_book(report.history.considered, report.history.continued_from, book)
    run.rename(soup_name(report))
    run.describe(soup_note(report, g, run.experiment_id))
    chosen = report.chosen
    uniform = next((d for d in report.dishes if d.method == BASELINE and d.n_ingredients > 1), None)
    run.log_figure(
        plots.soup_curve(
            chosen.result,
            METHODS[chosen.method].curve_x,
            list(report.table.val_accuracy),
            uniform.val_accuracy if uniform else None,
        ),
        tracking.SOUP_CURVE,
    )
    if report.best_test_accuracy is not None:
        points = [
            (v, t)
            for v, t in zip(report.table.val_accuracy, report.table.test_accuracy, strict=True)
            if t is not None and not pd.isna(t)
        ]
        marked = {f"{d.method} soup": (d.val_accuracy, d.test_accuracy) for d in report.dishes if d.result}
        run.log_figure(plots.val_vs_test(points, marked), tracking.VAL_VS_TEST)
    soup = Checkpoint(
        chosen.state,
        meta.model,
        meta.num_classes,
        meta.classes,
        meta.img_size,
        meta.split,
        meta.mean,
        meta.std,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / tracking.CHECKPOINT_FILE
        run.log_checkpoint(path, save_checkpoint(soup, path))
        lineage = lineage_of(report, g, run.id)
        note = (
            f"{soup_name(report)} from "
            f"{tracking.run_link(run.id, run.experiment_id, 'soup run ' + run.id[:8])}: "
            f"val {val_cell(chosen, report.best_val_accuracy)}, test {pct(chosen.test_accuracy)} "
            f"(best ingredient {pct(report.best_test_accuracy)}). Ingredients: "
            + ", ".join(tracking.run_link(r, g.top.info.experiment_id) for r in chosen.result.ingredients)
        )
        version, report.registry = run.register(
            path, name, chosen.val_accuracy, g.splits.fingerprint, lineage, note, judge
        )
    log.info("registered %s version %d; %s", name, version, report.registry)
