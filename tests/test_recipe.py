import pytest

from soups import SoupsError
from soups.recipe import Recipe, draw, load_recipe, params
from tests.conftest import ROOT, write_recipe

SPACE = {
    "lr": {"log_uniform": [1e-4, 1e-2]},
    "epochs": {"int": [1, 5]},
    "aug": {"choice": ["none", "light", "heavy"]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
}


def test_same_i_same_draw_and_different_i_different_draw():
    assert draw(SPACE, 3) == draw(SPACE, 3)
    draws = [draw(SPACE, i) for i in range(8)]
    assert len({d["lr"] for d in draws}) == 8
    for d in draws:
        assert 1e-4 <= d["lr"] <= 1e-2 and 1 <= d["epochs"] <= 5 and d["aug"] in SPACE["aug"]["choice"]
        assert isinstance(d["epochs"], int)


def test_draw_does_not_depend_on_key_order():
    assert draw(dict(reversed(list(SPACE.items()))), 5) == draw(SPACE, 5)


def test_layers_defaults_yaml_draw_overrides(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", data="/d", lr=0.5, epochs=7, space={"lr": SPACE["lr"]})
    r = load_recipe(path, {"i": 2, "epochs": None})
    assert r.lr == draw({"lr": SPACE["lr"]}, 2)["lr"]  # the draw beats the YAML
    assert r.epochs == 7 and r.data == "/d" and r.batch_size == Recipe().batch_size
    r = load_recipe(path, {"i": 2, "lr": "1e-3"})  # MLflow passes strings
    assert r.lr == 0.001 and r.i == 2


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-3\n")  # PyYAML reads this as a string
    assert load_recipe(path).lr == 0.001


@pytest.mark.parametrize(
    "yaml_values, overrides, message",
    [
        ({"lrr": 0.1}, {}, "unknown recipe key 'lrr'"),
        ({}, {"epoch": 3}, "unknown recipe key 'epoch'"),
        ({"space": {"lrate": {"uniform": [0, 1]}}}, {}, "unknown recipe key 'lrate'"),
        ({"space": {"lr": {"gauss": [0, 1]}}}, {}, "space.lr must be one of"),
        ({"epochs": "three"}, {}, "epochs='three' is not a valid int"),
        ({}, {"lr": "nan"}, "lr='nan' is not a valid float"),
        ({}, {"i": -1}, "i=-1 must be >= 0"),
        ({}, {"layout": "coco"}, "layout='coco' must be one of"),
        ({}, {"skip_bad": "maybe"}, "skip_bad='maybe'"),
    ],
)
def test_bad_keys_and_values_are_refused_by_name(tmp_path, yaml_values, overrides, message):
    path = write_recipe(tmp_path / "r.yaml", **yaml_values)
    with pytest.raises(SoupsError, match=message):
        load_recipe(path, overrides)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(SoupsError, match="nope.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["demo.yaml", "mask.yaml"])
def test_shipped_recipes_load_and_log_every_field(name):
    r = load_recipe(ROOT / "configs" / name, {"i": 3})
    assert r.space, "a shipped recipe defines a sweep space"
    p = params(r)
    assert p["i"] == 3 and "space" not in p and set(p) >= {"lr", "model", "pretrained", "data", "split_seed"}


def test_a_space_given_as_override_replaces_the_recipes(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", space={"lr": {"log_uniform": [1e-2, 1e-1]}})
    narrow = {"lr": {"log_uniform": [2e-4, 4e-4]}}
    r = load_recipe(path, {"i": 1, "space": narrow})
    assert 2e-4 <= r.lr <= 4e-4 and r.lr == draw(narrow, 1)["lr"]
