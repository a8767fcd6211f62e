"""The registered soup as MLflow serves it: `mlflow models serve` on 127.0.0.1 with
`models:/tiny@champion`, real images posted as base64. It answers as infer does, refuses hostile
requests with a 400 naming the reason, and goes on answering."""

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
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import free_port, wait_until_up
from tests.registered_store import infer, registered_store

pytestmark = pytest.mark.slow  # a real model server

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with registered_store(tmp_path_factory.mktemp("served")) as store:
        yield store


@pytest.fixture(scope="module")
def served(store):
    """The server's port, the first two eval images as base64 and infer's labels for them; the
    server is stopped after the module's tests."""
    work = store["work"]
    infer(store, "--output", str(work / "sub.csv"))
    expected = pd.read_csv(work / "sub.csv").set_index("ImageID").ans
    port, log = free_port(), work / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "PATH": f"{BIN}:{os.environ['PATH']}"}
    serve = ["models", "serve", "-m", "models:/tiny@champion", "--env-manager", "local"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), *serve, "-h", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log)
        names = store["ids"][:2]
        images = [b64((store["data"] / "eval" / "images" / n).read_bytes()) for n in names]
        yield dict(port=port, images=images, labels=[int(expected[n]) for n in names])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return b64(buf.getvalue())


def rows(*images: str) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}


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


def test_the_registered_model_carries_what_a_serving_environment_needs(store, tmp_path):
    """The packages the model imports, at the versions that made it; its signature; an example."""
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            "models:/tiny@champion", dst_path=str(tmp_path / "m"), tracking_uri=store["uri"]
        )
    )
    requirements = set((model_dir / "requirements.txt").read_text().split())
    assert {f"{p}=={metadata.version(p)}" for p in ("torch", "timm", "pillow", "mlflow")} <= requirements
    assert not any(r.startswith("soups") for r in requirements)  # not on any index: travels as code
    signature = yaml.safe_load((model_dir / "MLmodel").read_text())["signature"]
    assert '"name": "image"' in signature["inputs"] and "class_name" in signature["outputs"]
    assert (model_dir / "serving_input_example.json").is_file(), "an input example, as MLflow's flavours log"


def test_served_soup_answers_like_infer(served):
    code, text = post(served["port"], rows(*served["images"]))
    answer = json.loads(text)["predictions"]
    assert code == 200 and [a["label"] for a in answer] == served["labels"]
    assert all(0 < a["probability"] <= 1 and a["class_name"].count("/") == 2 for a in answer)


def test_a_transparent_png_is_answered(served):
    code, text = post(served["port"], rows(png(Image.new("RGBA", (28, 28), (0, 0, 0, 0)))))
    assert code == 200 and len(json.loads(text)["predictions"]) == 1


def test_hostile_requests_are_each_a_400_with_the_reason_and_the_server_goes_on(served):
    port, images = served["port"], served["images"]
    bomb = png(Image.new("1", (6400, 6400)))  # 41 M pixels in a PNG of a few KB
    for payload, said in [
        (rows(images[0], "not base64!"), "input image 1 cannot be decoded"),
        (rows(), "holds no images"),
        (rows(images[0], bomb), "input image 1 is 6400 x 6400"),
        ({"inputs": [[[[0.5, 0.5, 0.5]]]]}, "image"),  # a float array: the signature wants the column
        ({"dataframe_split": {"columns": ["img"], "data": [[images[0]]]}}, "image"),
    ]:
        code, text = post(port, payload)
        assert code == 400 and said in text, (payload.keys(), code, text[:500])
        assert "Traceback" not in text and "stack_trace" not in text
    code, text = post(port, rows(*images))
    assert code == 200 and [a["label"] for a in json.loads(text)["predictions"]] == served["labels"]
