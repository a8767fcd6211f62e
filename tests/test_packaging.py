"""The project's faces agree: pyproject vs conda.yaml, MLproject vs the click commands."""

import importlib
import re
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


def test_mlproject_parameters_match_the_click_commands():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["name"] == "soups" and spec["conda_env"] == "conda.yaml"
    for name, entry in spec["entry_points"].items():
        assert entry["command"].startswith(f"python entrypoints/{name}.py"), name
        command = importlib.import_module(f"entrypoints.{name}").main
        options = {p.name for p in command.params}
        declared = set(entry.get("parameters", {}))
        assert declared <= options, f"{name}: MLproject declares {declared - options} that click lacks"
        assert set(re.findall(r"--(\w+) \{(\w+)\}", entry["command"])) == {(p, p) for p in declared}
        for p, spec_p in entry.get("parameters", {}).items():
            assert "default" in spec_p, f"{name}: parameter {p} has no default"
