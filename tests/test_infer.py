"""infer end to end as a user runs it, on generated data with a registered model: the mask
submission format, whole folders, unreadable images, bad model references, ensembles and TTA."""

import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import write_image
from tests.registered_store import infer, registered_store, tiny_checkpoint

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with registered_store(tmp_path_factory.mktemp("infer")) as store:
        yield store


def test_mask_submission_keeps_info_csv_order_and_format(store, tmp_path):
    out = infer(store, "--output", str(tmp_path / "sub.csv"))
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert list(sub.columns) == ["ImageID", "ans"]
    assert sub.ImageID.tolist() == store["ids"]
    assert sub.ans.dtype.kind == "i" and sub.ans.between(0, 17).all()
    assert "predictions.csv: 7 rows" in out.stdout


def test_a_whole_mask_folder_is_predicted_in_the_plain_format_unscored(store, tmp_path):
    """The competition's format lists eval/ images only: every image under data gets soups' CSV."""
    out = infer(store, "--whole_folder", "true", "--output", str(tmp_path / "all.csv"))
    pred = pd.read_csv(tmp_path / "all.csv")
    assert list(pred.columns) == ["path", "label", "class_name"] and len(pred) == 3 * 7 + 7
    assert pred.path.str.startswith("train/images/").sum() == 21 and "not scored" in out.stdout


def test_unreadable_image_is_named_or_marked_never_dropped(store, tmp_path):
    victim = store["data"] / "eval" / "images" / store["ids"][2]
    original = victim.read_bytes()
    victim.write_bytes(b"")
    try:
        out = infer(store, check=False)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert (
            out.stderr.strip().splitlines()[-1].startswith("Error: cannot read image")
            and str(victim) in out.stderr
        )
        out = infer(store, "--skip_bad", "true", "--output", str(tmp_path / "sub.csv"))
        sub = pd.read_csv(tmp_path / "sub.csv")
        assert len(sub) == 7 and sub.ans.tolist()[2] == -1 and (sub.ans.drop(index=2) >= 0).all()
        assert "1 unreadable marked -1" in out.stdout
    finally:
        victim.write_bytes(original)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model_uri", "models:/tiny@nope"],
            "models:/tiny@nope does not resolve .* registered models: tiny \\(@champion\\)",
        ),
        (["--model_uri", "models:/ghost/1"], "models:/ghost/1 does not resolve"),
        (["--model_uri", "/no/such/model.pt"], "model '/no/such/model.pt' not found"),
        (["--vote", "attributes", "--layout", "imagefolder"], "vote=attributes needs the mask layout"),
    ],
)
def test_bad_model_references_fail_in_one_line(store, args, message):
    out = infer(store, *args, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert re.search(message, out.stderr.strip().splitlines()[-1]), out.stderr[-500:]


def test_labelled_folder_ensemble_and_tta(store, tmp_path):
    classes = ["cat", "dog", "fox"]
    folder = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in classes:
        for k in range(3):
            write_image(folder / c / f"{k}.jpg", rng, 50 + 80 * classes.index(c))
    members = [tiny_checkpoint(tmp_path / f"m{k}" / "model.pt", classes, seed=k) for k in range(3)]
    out = infer(
        store,
        "--layout",
        "imagefolder",
        "--data",
        str(folder),
        "--model_uri",
        str(members[0]),
        "--ensemble",
        ",".join(map(str, members)),
        "--weights",
        "1,2,3",
        "--tta",
        "hflip",
        "--probs",
        "true",
        "--output",
        str(tmp_path / "p.csv"),
        "--whole_folder",
        "true",  # these checkpoints were never trained on the folder: it has no test split of theirs
    )
    pred = pd.read_csv(tmp_path / "p.csv")
    assert list(pred.columns) == ["path", "label", "class_name", "p_cat", "p_dog", "p_fox"]
    assert len(pred) == 9 and np.allclose(pred[["p_cat", "p_dog", "p_fox"]].sum(1), 1, atol=1e-5)
    assert "ensemble: soft vote of 3" in out.stdout
    client = mlflow.MlflowClient(store["uri"])
    run = client.get_run(out.stdout.strip().split()[-1])
    m = run.data.metrics
    assert {"seconds_per_image", "ensemble_seconds_per_image"} <= set(m)
    assert not {"accuracy", "f1", "ensemble_accuracy"} & set(m), "a whole folder is never a test score"
    rows = [line for line in out.stdout.splitlines() if line.startswith(("soup:", "ensemble:"))]
    assert len(rows) == 2 and all(row[49:63].strip() == "-" for row in rows), out.stdout
    assert f"every image under {folder}" in out.stdout and "not scored" in out.stdout
    assert run.data.tags["soups.role"] == "inference" and run.data.params["tta"] == "hflip"
