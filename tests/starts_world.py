"""What tests/test_start.py and tests/test_start_auto.py share: a tiny Fashion-MNIST recipe with a
search space (its experiment `starts`), and reading its runs back."""

import mlflow

from soups import tracking
from soups.models import load_checkpoint
from tests.conftest import TINY, write_recipe


def start_recipe(tmp_path, fmnist_root):
    return write_recipe(
        tmp_path / "tiny.yaml",
        experiment="starts",
        data=str(fmnist_root),
        layout="fashion-mnist",
        **{**TINY, "epochs": 1, "start_epochs": 1},
        space={"seed": {"int": [0, 999]}, "lr": {"log_uniform": [1e-3, 3e-3]}},
    )


def runs_by_role(role):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("starts").experiment_id
    return client.search_runs([exp], f"tags.`soups.role` = '{role}'", order_by=["attributes.start_time ASC"])


def checkpoint(run):
    return load_checkpoint(tracking.cached_checkpoint(run)[0])
