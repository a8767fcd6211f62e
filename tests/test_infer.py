"""infer end to end on generated data with a registered model, and the served model over HTTP."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from soups import SoupsError, tracking
from soups.models import Checkpoint, create_model, save_checkpoint, sha256
from tests.conftest import (
    ROOT,
    TINY,
    free_port,
    make_imagefolder,
    make_mask_dataset,
    wait_until_up,
    write_image,
    write_recipe,
)

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers

BIN = Path(sys.executable).parent


def tiny_checkpoint(path: Path, classes: list[str], seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("test_efficientnet", len(classes))
    with torch.no_grad():
        model.get_classifier().weight.normal_(0, 0.5)  # a head that says something
    ckpt = Checkpoint(
        model.state_dict(), "test_efficientnet", len(classes), classes, 32, "s", [0.5] * 3, [0.5] * 3
    )
    save_checkpoint(ckpt, path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store holding registered model `tiny` (alias champion), a mask dataset with eval/."""
    work = tmp_path_factory.mktemp("infer")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "SOUPS_CACHE")}
    os.environ.update(MLFLOW_TRACKING_URI=uri, SOUPS_CACHE=str(work / "cache"))
    os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        data = make_mask_dataset(work / "mask", persons=3)
        from soups.layouts.mask import mask_classes

        (work / "ckpt").mkdir()
        ckpt = tiny_checkpoint(work / "ckpt" / "model.pt", mask_classes(), seed=0)
        with tracking.start("soup", "infer-test") as run:
            run.log_checkpoint(ckpt, sha256(ckpt))
            run.log_split("s")
            run.log_metrics({"val_accuracy": 0.5})
            version, _ = run.register(ckpt, "tiny", 0.5, "s")
        rng = np.random.default_rng(1)
        ids = [f"{k:03d}{'.png' if k % 2 else '.jpg'}" for k in range(7)][
            ::-1
        ]  # not sorted: order must be kept
        for name in ids:
            write_image(data / "eval" / "images" / name, rng, int(rng.integers(0, 255)))
        pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(data / "eval" / "info.csv", index=False)
        recipe = write_recipe(
            work / "tiny.yaml",
            experiment="infer-test",
            data=str(data),
            layout="mask",
            registered_model="tiny",
            workers=0,
        )
        yield dict(uri=uri, work=work, data=data, recipe=recipe, ids=ids, version=version)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def infer(store, *args, check=True):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "SOUPS_CACHE": str(store["work"] / "cache")}
    env.pop("MLFLOW_RUN_ID", None)
    out = subprocess.run(
        [sys.executable, "entrypoints/infer.py", "--recipe", str(store["recipe"]), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


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
    import re

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
    import mlflow

    client = mlflow.MlflowClient(store["uri"])
    run = client.get_run(out.stdout.strip().split()[-1])
    m = run.data.metrics
    assert {"seconds_per_image", "ensemble_seconds_per_image"} <= set(m)
    assert not {"accuracy", "f1", "ensemble_accuracy"} & set(m), "a whole folder is never a test score"
    rows = [line for line in out.stdout.splitlines() if line.startswith(("soup:", "ensemble:"))]
    assert len(rows) == 2 and all(row[49:63].strip() == "-" for row in rows), out.stdout
    assert f"every image under {folder}" in out.stdout and "not scored" in out.stdout
    assert run.data.tags["soups.role"] == "inference" and run.data.params["tta"] == "hflip"


def post(port: int, payload: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_served_soup_answers_like_infer(store, tmp_path):
    """`mlflow models serve` on 127.0.0.1 with the registered model: two real images posted as
    base64, the answers equal infer's for the same files; then the server is stopped."""
    infer(store, "--output", str(tmp_path / "sub.csv"))
    expected = pd.read_csv(tmp_path / "sub.csv").set_index("ImageID").ans
    # what a serving environment installs: the packages the model imports, at the versions that made it
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            "models:/tiny@champion", dst_path=str(tmp_path / "m"), tracking_uri=store["uri"]
        )
    )
    requirements = set((model_dir / "requirements.txt").read_text().split())
    assert {f"{p}=={metadata.version(p)}" for p in ("torch", "timm", "pillow", "mlflow")} <= requirements
    assert not any(r.startswith("soups") for r in requirements)  # not on any index: travels as code
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert (
        '"name": "image"' in mlmodel["signature"]["inputs"]
        and "class_name" in mlmodel["signature"]["outputs"]
    )
    assert (model_dir / "serving_input_example.json").is_file(), "an input example, as MLflow's flavours log"
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/tiny@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "serve.log")
        names = store["ids"][:2]
        images = [
            base64.b64encode((store["data"] / "eval" / "images" / n).read_bytes()).decode() for n in names
        ]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())["predictions"]
        assert [a["label"] for a in answer] == [int(expected[n]) for n in names]
        assert all(0 < a["probability"] <= 1 and a["class_name"].count("/") == 2 for a in answer)
        # a row that is not an image: 400 naming the row and the reason, no stack trace ...
        bad = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[images[0]], ["not base64!"]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", bad.encode(), {"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        text = refused.value.read().decode()
        assert refused.value.code == 400 and "input image 1 cannot be decoded" in text
        assert "Traceback" not in text and "stack_trace" not in text
        # hostile requests: each a 400 with its reason, never a stack trace or a silent guess
        side = 6400  # 41 M pixels in a PNG of a few KB
        buf = io.BytesIO()
        Image.new("1", (side, side)).save(buf, "PNG")
        bomb = base64.b64encode(buf.getvalue()).decode()
        for payload, said in [
            ({"dataframe_split": {"columns": ["image"], "data": []}}, "holds no images"),
            (
                {"dataframe_split": {"columns": ["image"], "data": [[images[0]], [bomb]]}},
                "input image 1 is 6400 x 6400",
            ),
            ({"inputs": [[[[0.5, 0.5, 0.5]]]]}, "image"),  # a float array: the signature wants the column
            ({"dataframe_split": {"columns": ["img"], "data": [[images[0]]]}}, "image"),
        ]:
            code, text = post(port, payload)
            assert code == 400 and said in text and "Traceback" not in text, (
                payload.keys(),
                code,
                text[:500],
            )
        buf = io.BytesIO()
        Image.new("RGBA", (28, 28), (0, 0, 0, 0)).save(buf, "PNG")  # transparent: shown as white
        code, text = post(
            port,
            {
                "dataframe_split": {
                    "columns": ["image"],
                    "data": [[base64.b64encode(buf.getvalue()).decode()]],
                }
            },
        )
        assert code == 200 and len(json.loads(text)["predictions"]) == 1
        # ... and the server goes on answering good requests
        with urllib.request.urlopen(
            urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            ),
            timeout=60,
        ) as r:
            assert [a["label"] for a in json.loads(r.read())["predictions"]] == [
                int(expected[n]) for n in names
            ]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
