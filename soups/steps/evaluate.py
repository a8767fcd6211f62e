"""The evaluate step: score ingredient runs on a held-out split, log the scores into those runs
and a table, confusion matrices and per-class errors into an evaluation run."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from soups import SoupsError, data, layouts, options, plots, tracking
from soups.evaluate import EvalSet, attribute_scores, confusion, default_device, metrics, predict
from soups.logits_memo import architecture, memo_logits
from soups.models import load_checkpoint
from soups.options import checked, option
from soups.recipe import Recipe, from_params
from soups.run_notes import data_parts, rebuilt

SPLITS = ("val", "test")
CONTEXTS = {"val": "validation", "test": "test"}


@dataclass(frozen=True)
class EvaluateOptions:
    run_id: str = option("", "Score only this run (default: every run lacking the score).")
    split: str = option("test", "Held-out split to score on.", choices=SPLITS)
    source: str = option("", "Experiment whose runs to score (default: the evaluation run's own).")


@dataclass
class EvalReport:
    run_id: str
    split: str
    scores: pd.DataFrame
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame)
    message: str = ""


def score_run(run, given: dict, split: str, sets: dict):
    """Metrics of one ingredient run on `split`, its confusion matrix, class names and a gallery of
    its worst mistakes. Held-out sets are decoded once and shared by every run with the same split
    and image size."""
    rid = run.info.run_id
    recipe = from_params(tracking.run_params(run), given)  # enough to know which sets it needs
    key = (
        tracking.split_of(run),
        recipe.img_size,
        recipe.data,
        recipe.layout,
        recipe.age_bins,
        recipe.relabel,
    )
    if key not in sets:
        recipe, splits = rebuilt(run, given)
        part = getattr(splits, split)
        if not len(part):
            raise SoupsError(f"run {rid}: its {split} split is empty")
        decoded = data.decode(part, recipe.img_size, recipe.workers, recipe.skip_bad, f"decode {split}")
        (dataset,) = data_parts(recipe, splits, (CONTEXTS[split],))
        sets[key] = (EvalSet.from_decoded(decoded, len(part.classes)), dataset)
    evalset = sets[key][0]
    ckpt = load_checkpoint(tracking.cached_checkpoint(run)[0])
    device = default_device()
    model = ckpt.build()
    logits, _ = memo_logits(  # kept for the steps after: infer's ensemble votes with these logits
        architecture(model),
        ckpt.state_dict,
        evalset.images,
        ckpt.mean,
        ckpt.std,
        device,
        lambda: predict(model, evalset, ckpt.mean, ckpt.std, 2 * recipe.batch_size, device),
    )
    scores = metrics(logits, evalset.labels)
    scores.pop("correct")
    attributes = layouts.get(recipe.layout).attributes
    if attributes is not None:  # the mask competition's report: error rate of each attribute
        accuracy = attribute_scores(attributes, logits, evalset.labels)
        scores |= {f"{a}_error": 1.0 - v for a, v in accuracy.items()}
    gallery = plots.misclassified(
        evalset.images.numpy(), evalset.labels.numpy(), logits.softmax(1).numpy(), ckpt.classes
    )
    return scores, confusion(logits.argmax(1), evalset.labels, ckpt.num_classes), ckpt.classes, gallery


def evaluation_note(split: str, rows: list[dict], sets: dict, experiment_id: str) -> str:
    """The evaluation run's description: what it scored, on which images, with links."""
    parts = ", ".join(f"`{part.name}` ({part.images} images)" for _, part in sets.values())
    lines = [
        f"**Held-out scores on {split}** of {len(rows)} ingredient run(s), on {parts or 'no images'}.",
        "",
        "| run | i | accuracy | macro F1 | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = "-" if "accuracy" not in r else f"{100 * r['accuracy']:.2f}%"
        f1 = "-" if "f1" not in r else f"{r['f1']:.4f}"
        link = tracking.run_link(r["run_id"], experiment_id)
        lines.append(f"| {link} | {r.get('i', '')} | {acc} | {f1} | {r.get('error', '')} |")
    return "\n".join(lines)


def evaluate_runs(recipe: Recipe, given: dict, opts: EvaluateOptions | None = None) -> EvalReport:
    """Score one run, or every finished ingredient run of the experiment still lacking
    `<split>_accuracy`; a run that cannot be scored gets its reason in the table."""
    opts = checked(opts or EvaluateOptions())
    split = opts.split
    with tracking.start_step("evaluation", recipe, f"evaluate {split}") as run:
        run.log_params(options.params(opts))
        if opts.run_id:
            runs = [tracking.get_run(opts.run_id)]
        else:
            experiment = tracking.experiment_or_own(opts.source, run)
            runs = [r for r in tracking.ranked_ingredients(experiment) if not tracking.has_score(r, split)]
        rows, per_class, sets = [], {}, {}
        for r in runs:
            rid = r.info.run_id
            try:
                scores, cm, classes, gallery = score_run(r, given, split, sets)
            except SoupsError as e:
                rows.append({"run_id": rid, "error": str(e)})
                continue
            rows.append({"run_id": rid, "i": tracking.member_of(r), "model": tracking.model_of(r), **scores})
            if split == "test":  # val scores stay in the evaluation run: the ranking curve is the finetune's
                tracking.log_scores(rid, split, scores)
            figure = plots.confusion_matrix(cm, classes, f"run {rid[:8]} on {split}")
            run.log_figure(figure, tracking.confusion_figure(rid))
            if gallery is not None:
                run.log_figure(gallery, tracking.gallery_figure(rid))
            per_class[rid[:8]] = 1 - np.diag(cm) / np.maximum(cm.sum(1), 1)
            per_class.setdefault("class", classes)
        scores = pd.DataFrame(rows)
        if not runs:
            hint = f"every ingredient run already has {split} scores: pass -P run_id=<id> to score one again"
            return EvalReport(run.id, split, scores, message=hint)
        table = pd.DataFrame(per_class)
        scored = [r for r in rows if "error" not in r]
        run.rename(f"evaluate {split} ({len(scored)} runs)")
        run.describe(evaluation_note(split, rows, sets, run.experiment_id))
        run.log_datasets(list({part.digest: part for _, part in sets.values()}.values()))
        run.log_table(scores, tracking.SCORES)
        if not table.empty:
            table = table[["class", *[c for c in table.columns if c != "class"]]]
            run.log_table(table, tracking.PER_CLASS_ERRORS)
        return EvalReport(run.id, split, scores, table, f"scored {len(runs)} run(s) on {split}")
