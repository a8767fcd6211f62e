"""infer on a model fine-tuned on an image folder, given as an ingredient run, a registered soup or
a checkpoint file: it predicts the test split rebuilt from what the model was trained with, and
scores nothing else (in-process against a SQLite store)."""

import os

import pytest

from soups import SoupsError, tracking
from soups.models import sha256
from tests.conftest import TINY, make_imagefolder, write_recipe

pytestmark = pytest.mark.slow  # trains a model


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory):
    """An image folder, a model fine-tuned on it (an ingredient run), the same weights registered
    as a soup of that run (`folder-soup@champion`) and as a plain checkpoint file."""
    from soups.recipe import load_recipe, load_splits
    from soups.steps.finetune import finetune

    work = tmp_path_factory.mktemp("folder")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "SOUPS_CACHE", "MLFLOW_RUN_ID")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, SOUPS_CACHE=str(work / "cache"))
    os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        data = make_imagefolder(work / "photos", per_class=7)  # 21 images: 5 test, 5 val, 11 train
        path = write_recipe(
            work / "r.yaml",
            experiment="folder",
            data=str(data),
            layout="imagefolder",
            **{**TINY, "epochs": 1},
        )
        recipe = load_recipe(path)
        run_id = finetune(recipe)
        splits = load_splits(recipe)
        ckpt = tracking.cached_checkpoint(tracking.get_run(run_id))[0]
        file = work / "model.pt"
        file.write_bytes(ckpt.read_bytes())
        with tracking.start("soup", "folder") as run:
            run.log_checkpoint(file, sha256(file))
            run.log_split(splits.fingerprint)
            lineage = tracking.Lineage(run.id, "uniform", [run_id], "", "", splits.fingerprint, 0.5, None)
            run.register(file, "folder-soup", 0.5, splits.fingerprint, lineage)
        yield dict(uri=uri, path=path, recipe=recipe, splits=splits, run_id=run_id, file=file)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def dataset_contexts(run_id: str) -> dict[str, tuple[str, str]]:
    run = tracking.get_run(run_id)
    return {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): (d.dataset.name, d.dataset.digest)
        for d in run.inputs.dataset_inputs
    }


def test_infer_scores_the_test_split_never_the_training_images(folder_model):
    """An ingredient run, a registered soup of it and its checkpoint file: each predicts exactly
    the test split rebuilt from what the model was trained with, and only that is scored."""
    from soups.data import digest
    from soups.steps.infer import InferOptions, infer

    splits = folder_model["splits"]
    assert len(splits.test) and len(splits.train)
    uris = [f"runs:/{folder_model['run_id']}", "models:/folder-soup@champion", str(folder_model["file"])]
    for uri in uris:
        out = infer(folder_model["recipe"], InferOptions(model_uri=uri))
        assert out.frame.path.tolist() == splits.test.keys, uri
        assert not set(out.frame.path) & set(splits.train.keys), f"{uri} scored training images"
        assert out.results["soup"].accuracy is not None and out.part == "test"
        assert dataset_contexts(out.run_id) == {"test": ("photos/test", digest(splits.test))}


def test_a_checkpoint_file_on_another_split_is_refused_in_one_line(folder_model):
    from soups.recipe import load_recipe
    from soups.steps.infer import InferOptions, infer

    other = load_recipe(folder_model["path"], {"split_seed": 5})
    with pytest.raises(SoupsError, match="was trained on split .* whole_folder") as e:
        infer(other, InferOptions(model_uri=str(folder_model["file"])))
    assert "\n" not in str(e.value)


def test_predicting_a_whole_folder_logs_no_test_accuracy(folder_model):
    """Every image under data includes the training images: predicted, never scored as test."""
    from soups.steps.infer import InferOptions, infer

    out = infer(
        folder_model["recipe"], InferOptions(model_uri=f"runs:/{folder_model['run_id']}", whole_folder=True)
    )
    assert len(out.frame) == 21 and set(folder_model["splits"].train.keys) <= set(out.frame.path)
    assert out.results["soup"].accuracy is None and out.part == "folder"
    metrics = tracking.get_run(out.run_id).data.metrics
    assert not {"accuracy", "f1"} & set(metrics) and metrics["images"] == 21
    assert "test" not in dataset_contexts(out.run_id)
