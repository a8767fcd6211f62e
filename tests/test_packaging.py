"""The project's packages agree: pyproject vs conda.yaml (MLproject vs the commands: test_options.py)."""

import tomllib

import yaml

from tests.conftest import ROOT


def test_conda_env_pins_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip) == sorted(project["dependencies"])
    assert all("==" in dep for dep in project["dependencies"]), "every dependency is pinned"
    python = [d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"] and project["requires-python"] == "==3.11.*"
