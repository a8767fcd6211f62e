"""A SQLite store with a registered model (`tiny@champion`) and a mask dataset with `eval/`, and
`infer` run on it as a user runs it: what tests/test_infer.py and tests/test_served_model.py share."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from soups import tracking
from soups.models import Checkpoint, create_model, save_checkpoint, sha256
from tests.conftest import ROOT, make_mask_dataset, write_image, write_recipe


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


@contextmanager
def registered_store(work: Path):
    """A SQLite store holding registered model `tiny` (alias champion), a mask dataset with eval/."""
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
        ids = [f"{k:03d}{'.png' if k % 2 else '.jpg'}" for k in range(7)][::-1]  # kept in this order
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
