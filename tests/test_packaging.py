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


def default_of(command, name: str) -> str:
    """What a click option falls back to: its own default, or (recipe options) the recipe's."""
    from dataclasses import fields

    from entrypoints.common import DEFAULT_RECIPE
    from soups.recipe import Recipe

    option = next(p for p in command.params if p.name == name)
    if option.default is not None:
        return str(option.default)
    if name == "recipe":
        return DEFAULT_RECIPE
    return str(next(f.default for f in fields(Recipe) if f.name == name))


def mlproject_drift(spec: dict) -> list[str]:
    """MLproject defaults that are not what the commands themselves would use."""
    out = []
    for name, entry in spec["entry_points"].items():
        command = importlib.import_module(f"entrypoints.{name}").main
        for p, spec_p in entry.get("parameters", {}).items():
            if str(spec_p["default"]) != default_of(command, p):
                out.append(f"{name}.{p}: MLproject {spec_p['default']!r}, command {default_of(command, p)!r}")
    return out


def test_mlproject_defaults_are_the_commands_defaults():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert mlproject_drift(spec) == []
    spec["entry_points"]["greedy_soup"]["parameters"]["method"]["default"] = "uniform"  # drift
    assert mlproject_drift(spec) == ["greedy_soup.method: MLproject 'uniform', command 'greedy'"]


def test_each_step_option_is_declared_once_and_the_commands_follow_it():
    from soups.options import cli_fields
    from soups.steps.evaluate import EvaluateOptions
    from soups.steps.finetune import TrainingOptions
    from soups.steps.infer import InferOptions
    from soups.steps.soup.step import SoupOptions
    from soups.steps.sweep.step import SweepOptions

    steps = {
        "greedy_soup": SoupOptions,
        "infer": InferOptions,
        "sweep": SweepOptions,
        "evaluate": EvaluateOptions,
        "finetune": TrainingOptions,
        "start": TrainingOptions,
    }
    for name, cls in steps.items():
        options = {p.name: p for p in importlib.import_module(f"entrypoints.{name}").main.params}
        for f in cli_fields(cls):
            option = options[f.name]
            assert option.default == f.default and option.help == f.metadata["help"], f"{name}.{f.name}"
            if "choices" in f.metadata:
                assert list(option.type.choices) == [str(c) for c in f.metadata["choices"]], (
                    f"{name}.{f.name}"
                )
