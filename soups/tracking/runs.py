"""One run and what the steps log into it (params, epochs, summaries, datasets, checkpoints,
descriptions, the soup's report and its registration)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from soups.tracking import promotion, registry
from soups.tracking.names import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CLASSES_PARAM,
    CONTINUED_FROM,
    INGREDIENTS,
    MAX_NOTE_LENGTH,
    MAX_PARAM_LENGTH,
    MAX_PARAMS_PER_BATCH,
    NOTE,
    PREDICTIONS,
    RANK_METRIC,
    RECIPE,
    SHA256,
    SKIPPED,
    SOUP_BOOK,
    SOUP_STEP_METRIC,
    SPLIT,
    START,
    START_RUN,
)
from soups.tracking.server import raising_unreachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPart:
    """One part of a dataset a run used: its name (`<data>/<split>`), where it lives, a digest
    that changes exactly when its images or labels do, its context (training / validation /
    test / inference) and its size."""

    name: str
    source: str
    digest: str
    context: str
    images: int


class Run:
    """The active run, with the few things the steps log into it."""

    def __init__(self, run_id: str, named_by_user: bool = False):
        self.id = run_id
        self.client = MlflowClient()
        self.named_by_user = named_by_user  # `mlflow run --run-name`: the steps never rename it

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params that the run does not hold yet. `mlflow run` has already logged the `-P`
        values as typed (`1e-3`, quoted paths); re-logging a param with another string raises."""
        held = self.client.get_run(self.id).data.params
        items = [
            mlflow.entities.Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items() if k not in held
        ]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.id, params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        # Synchronous on purpose: MLflow's asynchronous logging thread cost 17% of the training
        # steps/s on 2 cores (bench/tracking_overhead.py); one batch per epoch costs ~1%.
        with raising_unreachable():
            self.log_metrics(metrics, step=epoch)

    def log_metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Log the metrics that have a value (a dataset without a test split has no test score)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.id, metrics=items)

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Metrics that sum a run up (no step): what the runs table sorts by."""
        with raising_unreachable():
            self.log_metrics(metrics)

    def log_recipe(self, text: str) -> None:
        self.client.log_text(self.id, text, RECIPE)

    def log_relabel(self, changes, source: Path) -> None:
        """The corrections file as given, every changed label, and how many changed."""
        import pandas as pd

        self.client.log_artifact(self.id, str(source), "relabel")
        frame = pd.DataFrame(list(changes), columns=["image", "old_label", "new_label"])
        self.log_table(frame, "relabel/changed_labels.csv")
        self.log_metrics({"relabelled_images": len(frame)})

    def log_training_data(
        self, classes: int, train: int, val: int, test: int, skipped: int, processes: int
    ) -> None:
        """What a fine-tune trained and validated on, and how many processes shared it."""
        self.log_params(
            {
                CLASSES_PARAM: classes,
                "n_train": train,
                "n_val": val,
                "n_test": test,
                "skipped_images": skipped,
                "processes": processes,
            }
        )

    def log_split(self, fingerprint: str) -> None:
        self.client.set_tag(self.id, SPLIT, fingerprint)

    def rename(self, name: str) -> None:
        """Name the run, unless a person named it."""
        if not self.named_by_user:
            self.client.update_run(self.id, name=name[:250])

    def describe(self, markdown: str) -> None:
        """The run's description in the UI (Markdown)."""
        self.client.set_tag(self.id, NOTE, markdown[:MAX_NOTE_LENGTH])

    def log_datasets(self, datasets: list[DataPart]) -> None:
        """The data a run trained on or was scored on, as MLflow dataset inputs (the UI's Dataset
        column and Datasets page)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for part in datasets:
            with warnings.catch_warnings():
                # MLflow registers its local-file source twice and warns that a path is ambiguous.
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(part.source)
            dataset = MetaDataset(source, name=part.name, digest=part.digest)._to_mlflow_entity()
            tags = [InputTag(MLFLOW_DATASET_CONTEXT, part.context), InputTag("images", str(part.images))]
            inputs.append(DatasetInput(dataset, tags))
        # Runs that start together log the same dataset at once, and MLflow's SQL store can then
        # refuse the second insert of that dataset row: once more finds the row there. A dataset
        # input is what the UI shows, never worth failing a fine-tune for.
        for attempt in range(3):
            try:
                with raising_unreachable():
                    self.client.log_inputs(self.id, datasets=inputs)
                return
            except MlflowException as e:
                if attempt == 2:
                    log.warning("run %s: dataset inputs not logged: %s", self.id, str(e).splitlines()[0])
                time.sleep(0.5 * (attempt + 1))

    def log_start(self, digest: str, start_run: str = "") -> None:
        """Which exact weights this run started from: ingredients of one soup must share them."""
        self.set_tags({START: digest, **({START_RUN: start_run} if start_run else {})})

    def log_checkpoint(self, path: Path, digest: str) -> None:
        """Upload `path` as `checkpoint/model.pt`, then tag its sha256: a run carries the tag only
        once its checkpoint is whole."""
        if Path(path).name != CHECKPOINT_FILE:
            raise ValueError(f"checkpoint file must be named {CHECKPOINT_FILE}")
        with raising_unreachable():
            self.client.log_artifact(self.id, str(path), CHECKPOINT_DIR)
            self.client.set_tag(self.id, SHA256, digest)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.id).info.experiment_id

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.id, text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        # One batch: atomic, and MLflow's batch write retries the insert race of two processes
        # tagging one run at the same moment (a single `set_tag` does not).
        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.id, "FINISHED")

    def log_table(self, frame, name: str) -> None:
        self.client.log_text(self.id, frame.to_csv(index=False), name)

    def log_figure(self, figure, name: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.id, figure, name)
        plt.close(figure)

    def log_soup(self, soup) -> None:
        """A `soups.steps.soup.report.SoupReport`: the soup's params, metrics (the chosen method's as
        `val_accuracy`, `test_accuracy`; each compared method's as `<method>_val_accuracy`, ...),
        the chosen method's curve and the ingredient table."""
        chosen = soup.chosen
        compared = ",".join(d.method for d in soup.dishes[1:])
        self.log_params(
            {**soup.params, "compare": compared, "rank_by": RANK_METRIC, "candidates": soup.candidates}
        )
        metrics = {
            "val_accuracy": chosen.val_accuracy,
            "test_accuracy": chosen.test_accuracy,
            "n_ingredients": chosen.n_ingredients,
            # on the very images `val_accuracy` is on (a learned soup: the half it did not fit on)
            "best_ingredient_val_accuracy": chosen.result.best_accuracy,
            "best_ingredient_test_accuracy": soup.best_test_accuracy,
            "best_ingredient_logged_val_accuracy": soup.best.logged_val_accuracy,
            # on the same images with the same treatment (a learned soup: the part of val it did
            # not fit on, against the best ingredient on that part)
            "val_gain_over_best_ingredient": chosen.result.val_gain,
            **gain_metrics("test_gain_over_best_ingredient", chosen.test_gain),
            "n_usable": soup.n_usable,
            "held_out_images_scored": soup.images_scored,
            "held_out_images_full_evaluation": soup.images_full,
            "bn_recalibration_images": soup.recalibration_images,
            "checkpoints_downloaded": soup.downloaded,
            "models_scored": soup.history.models_scored if soup.history else None,
            "scores_reused": soup.history.scores_reused if soup.history else None,
            "new_candidates": len(soup.history.new) if soup.history else None,
            **{f"{chosen.method}_{k}": v for k, v in chosen.result.details.items()},
        }
        for dish in soup.dishes[1:]:
            if dish.result is not None and (dish.n_ingredients > 1 or dish.method != "uniform"):
                metrics |= {
                    f"{dish.method}_val_accuracy": dish.val_accuracy,
                    f"{dish.method}_test_accuracy": dish.test_accuracy,
                    f"{dish.method}_val_gain_over_best_ingredient": dish.result.val_gain,
                    **gain_metrics(f"{dish.method}_test_gain_over_best_ingredient", dish.test_gain),
                    f"{dish.method}_n_ingredients": dish.n_ingredients,
                    **{f"{dish.method}_{k}": v for k, v in dish.result.details.items()},
                }
        self.log_metrics(metrics)
        for x, correct in chosen.result.curve:
            self.log_metrics({SOUP_STEP_METRIC: correct / chosen.result.held_out}, step=x)
        self.log_table(soup.table, INGREDIENTS)

    def log_soup_book(self, considered: list[str], continued_from: str, book: dict) -> None:
        """What a later soup needs to continue this one: the runs considered, the scores paid for."""
        self.set_tags({CONTINUED_FROM: continued_from})
        doc = {"considered": considered, "continued_from": continued_from, "book": book}
        self.client.log_dict(self.id, doc, SOUP_BOOK)

    def log_predictions(self, frame, unreadable: list[str]) -> None:
        """The submission table and the images that could not be read."""
        import pandas as pd

        self.log_table(frame, PREDICTIONS)
        if unreadable:
            self.log_table(pd.DataFrame({"unreadable": unreadable}), SKIPPED)

    def log_inference(
        self, results: dict[str, tuple[float | None, float | None, float]], images: int, unreadable: int
    ) -> None:
        """Per predictor (`soup`, `ensemble`): accuracy and f1 where labels exist, seconds per image."""
        metrics: dict[str, float | None] = {"images": images, "unreadable_images": unreadable}
        for name, (accuracy, f1, seconds) in results.items():
            prefix = "" if name == "soup" else f"{name}_"
            metrics |= {
                f"{prefix}accuracy": accuracy,
                f"{prefix}f1": f1,
                f"{prefix}seconds_per_image": seconds,
            }
        self.log_metrics(metrics)

    def register(
        self,
        checkpoint: Path,
        name: str,
        val_accuracy: float,
        split: str,
        lineage: registry.Lineage | None = None,
        note: str = "",
        judge: Callable[[], promotion.Rival | None] | None = None,
    ) -> tuple[int, str]:
        """`registry.register`, from this run (the active one)."""
        return registry.register(checkpoint, name, val_accuracy, split, lineage, note, judge)


def log_scores(run_id: str, split: str, scores: dict[str, float]) -> None:
    """Held-out scores into an (already finished) ingredient run, as `<split>_<metric>`."""
    Run(run_id).log_metrics({f"{split}_{k}": v for k, v in scores.items()})


def gain_metrics(name: str, gain) -> dict[str, float | None]:
    """A `significance.Gain` as metrics: the gain, its 95% interval and its p-value."""
    if gain is None:
        return {}
    return {name: gain.gain, f"{name}_low": gain.low, f"{name}_high": gain.high, f"{name}_p": gain.p_value}
