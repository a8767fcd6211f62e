"""Options declared once (soups/options.py): MLproject, the click commands, the recipe and the soup
methods all follow the dataclass fields, and every value is coerced and checked the same way."""

import dataclasses
import importlib
import re

import pytest
import yaml

from soups import SoupsError
from soups.options import cli_fields, coerce, filled, option
from tests.conftest import ROOT


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


def test_each_soup_method_parameter_is_an_option_field_and_greedy_soup_follows_it():
    from soups.soup import METHODS, all_params

    command = {p.name: p for p in importlib.import_module("entrypoints.greedy_soup").main.params}
    names = [f.name for f in all_params()]
    assert len(names) == len(set(names)) and {"accept", "wise_steps", "learned_lr"} <= set(names)
    for m in METHODS.values():
        for f in m.params:
            option = command[f.name]
            assert f.metadata["help"] in option.help and f"[default: {f.default}]" in option.help, f.name
            if "choices" in f.metadata:
                assert list(option.type.choices) == [str(c) for c in f.metadata["choices"]], f.name
        assert m.resolve({}) == {f.name: f.default for f in m.params}, m.name


def test_augmentation_and_loss_choices_are_their_registries():
    from soups.augment import PIPELINES
    from soups.losses import LOSSES
    from soups.recipe import FIELDS

    assert FIELDS["loss"].metadata["choices"] == tuple(LOSSES)
    for name in ("aug", "oversample_aug"):
        assert FIELDS[name].metadata["choices"] == tuple(PIPELINES)
        with pytest.raises(SoupsError) as e:
            coerce(FIELDS[name], "wild", "parameter")
        assert str(e.value) == f"parameter: {name}='wild' must be one of none, light, medium, heavy"


@dataclasses.dataclass(frozen=True)
class Example:
    steps: int = option(10, "How many.")
    share: float = option(0.5, "How much.")
    fast: bool = option(False, "Whether.")
    mode: str = option("a", "Which.", ("a", "b"))
    name: str = option("", "Its name on the command line is `from`.", cli="from")


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, Example()),
        ({"steps": "4", "share": "0.25", "fast": "yes", "mode": "b"}, Example(4, 0.25, True, "b")),
        ({"steps": 3.0, "fast": 0, "from": "x"}, Example(steps=3, name="x")),
        ({"steps": None, "mode": None}, Example()),
    ],
)
def test_filled_coerces_what_is_given_and_keeps_the_defaults(given, expected):
    assert filled(Example, given, "parameter") == expected


@pytest.mark.parametrize(
    "given, message",
    [
        ({"steps": "many"}, "parameter: steps='many' is not a valid int"),
        ({"steps": 2.5}, "parameter: steps=2.5 is not a valid int"),
        ({"share": "nan"}, "parameter: share='nan' is not a valid float"),
        ({"fast": "maybe"}, "parameter: fast='maybe' is not a valid bool"),
        ({"mode": "c"}, "parameter: mode='c' must be one of a, b"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_option(given, message):
    with pytest.raises(SoupsError) as e:
        filled(Example, given, "parameter")
    assert str(e.value) == message
