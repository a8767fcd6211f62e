"""Bad input, each through the real command: a one-line error naming the culprit, exit code 1, no
traceback, and no run left RUNNING or holding a checkpoint."""

import os
import shutil
import subprocess
import sys

import mlflow
import pytest
import torch

from soups.models import create_model
from tests.conftest import ROOT, TINY, make_imagefolder, write_recipe

pytestmark = pytest.mark.slow  # real processes: servers, `mlflow run`, workers


def copy_of(mask_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(mask_root, root)
    return root


def first_person(root):
    return sorted((root / "train" / "images").iterdir())[0]


def corrupt_jpeg(root, tmp_path):
    victim = first_person(root) / "mask1.jpg"
    victim.write_bytes(victim.read_bytes()[:200])
    return [], str(victim)


def corrupt_jpeg_decoded_each_epoch(root, tmp_path):
    """Above cache_mb the loader's worker processes decode it: the line still names the file."""
    _, victim = corrupt_jpeg(root, tmp_path)
    return ["--cache_mb", "0", "--workers", "2"], victim


def empty_png(root, tmp_path):
    victim = first_person(root) / "normal.png"
    victim.write_bytes(b"")
    return [], str(victim)


def empty_class_folder(root, tmp_path):
    folder = make_imagefolder(tmp_path / "folder")
    (folder / "empty").mkdir()
    return ["--layout", "imagefolder", "--data", str(folder)], str(folder / "empty")


def unparsable_folder(root, tmp_path):
    bad = first_person(root).rename(root / "train" / "images" / "john_doe")
    return [], str(bad)


def unknown_model(root, tmp_path):
    return ["--model", "efficientnet_b99"], "unknown timm model 'efficientnet_b99'"


def misfit_pretrained(root, tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(create_model("test_resnet", 10).state_dict(), path)
    return ["--pretrained", str(path)], str(path)


def nan_loss(root, tmp_path):
    return ["--lr", "1e30"], "lr"


def negative_index(root, tmp_path):
    return ["--i", "-1"], "i=-1 must be >= 0"


def unknown_recipe_key(root, tmp_path):
    path = write_recipe(tmp_path / "typo.yaml", lerning_rate=0.1)
    return ["--recipe", str(path)], "lerning_rate"


CASES = [
    corrupt_jpeg,
    corrupt_jpeg_decoded_each_epoch,
    empty_png,
    empty_class_folder,
    unparsable_folder,
    unknown_model,
    misfit_pretrained,
    nan_loss,
    negative_index,
    unknown_recipe_key,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_fails_in_one_line_with_nothing_left_behind(case, tmp_path, tracking_uri, mask_root):
    """Exit 1, one line naming the culprit, no traceback, any run FAILED without checkpoint."""
    root = copy_of(mask_root, tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", experiment="bad", data=str(root), layout="mask", **TINY)
    args, culprit = case(root, tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    out = subprocess.run(
        [sys.executable, "entrypoints/finetune.py", "--recipe", str(recipe), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr[-1500:]
    assert lines[-1].startswith("Error:") and culprit in lines[-1], lines[-1]
    client = mlflow.MlflowClient(tracking_uri)
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert run.info.status == "FAILED" and client.list_artifacts(run.info.run_id, "checkpoint") == []


def test_missing_info_csv_is_named_by_infer(tmp_path, tracking_uri, mask_root):
    """infer without eval/info.csv: exit 1, one line naming the file."""
    root = copy_of(mask_root, tmp_path)
    ckpt = tmp_path / "model.pt"
    from soups.layouts.mask import mask_classes
    from soups.models import Checkpoint, save_checkpoint

    model = create_model("test_efficientnet", 18)
    save_checkpoint(
        Checkpoint(
            model.state_dict(), "test_efficientnet", 18, mask_classes(), 32, "s", [0.5] * 3, [0.5] * 3
        ),
        ckpt,
    )
    recipe = write_recipe(tmp_path / "r.yaml", experiment="bad", data=str(root), layout="mask", workers=0)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    out = subprocess.run(
        [sys.executable, "entrypoints/infer.py", "--recipe", str(recipe), "--model_uri", str(ckpt)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip().splitlines()[-1] == f"Error: {root / 'eval' / 'info.csv'} not found (mask layout: "
        "<root>/eval/info.csv with columns ImageID, ans)"
    )


def test_info_csv_paths_cannot_escape_the_dataset(tmp_path):
    """An ImageID of ../../etc/passwd is refused."""
    from soups import SoupsError
    from soups.layouts.mask import mask_eval

    (tmp_path / "eval" / "images").mkdir(parents=True)
    (tmp_path / "eval" / "info.csv").write_text("ImageID,ans\n../../etc/passwd,0\n")
    with pytest.raises(SoupsError, match="outside the dataset root"):
        mask_eval(tmp_path)
