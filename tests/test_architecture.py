"""The code's shape, checked: no import cycle in `soups/`, steps over the library (never the other
way, never one step into another), values rather than recipes below the steps, MLflow only inside
`soups/tracking/` with the names it gives things spelled only there, and no module or function
(benchmarks and tests included) grows past what one reader holds in mind (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRACKING = ROOT / "soups" / "tracking"
CODE = sorted([*(ROOT / "soups").rglob("*.py"), *(ROOT / "entrypoints").glob("*.py")])
OUTSIDE = [p for p in CODE if TRACKING not in p.parents]
# Methods of tracking.Run whose first argument names things in MLflow (params, metrics, tags) or is
# an artifact path: outside the tracking package those must come from a declaration, not a literal.
NAMING_CALLS = {"log_params", "log_metrics", "log_summary", "set_tags", "log_table", "log_text", "log_figure"}
ARTIFACT_CALLS = {"log_table", "log_text", "log_figure"}  # (content, artifact path)
TAG_NAME = re.compile(r"^(soups|mlflow)\.[a-z_.]+$")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else path.name


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@pytest.mark.parametrize("path", OUTSIDE, ids=rel)
def test_only_the_tracking_package_imports_mlflow(path):
    for node in ast.walk(tree(path)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        assert not [n for n in names if n.split(".")[0] == "mlflow"], (
            f"{rel(path)}:{node.lineno} imports mlflow"
        )


def naming_literals(path: Path) -> list[str]:
    """Where a module outside tracking spells an MLflow name: a tag-like string, or a literal name
    (dict key or artifact path) handed straight to a Run method that names things."""
    found = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and TAG_NAME.match(node.value):
            found.append(f"{rel(path)}:{node.lineno} {node.value!r}")
        if read_by_name(node):
            found.append(f"{rel(path)}:{node.lineno} reads a run's {read_by_name(node)} by a literal name")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in NAMING_CALLS or not node.args:
            continue
        named_by = node.args[1:] if node.func.attr in ARTIFACT_CALLS else node.args[:1]
        for arg in named_by:
            if isinstance(arg, ast.Dict) and any(isinstance(k, ast.Constant) for k in arg.keys):
                found.append(f"{rel(path)}:{node.lineno} {node.func.attr} with literal keys")
            if isinstance(arg, ast.Constant | ast.JoinedStr):
                found.append(f"{rel(path)}:{node.lineno} {node.func.attr} with a literal name")
    return found


def read_by_name(node: ast.AST) -> str:
    """`run.data.params["x"]` or `run.data.metrics.get("x")`: which of params, metrics, tags."""
    if isinstance(node, ast.Subscript):
        target, key = node.value, node.slice
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        target, key = node.func.value, node.args[0] if node.args else None
    else:
        return ""
    if not (isinstance(key, ast.Constant) and isinstance(target, ast.Attribute)):
        return ""
    parent = target.value
    if (
        target.attr in ("params", "metrics", "tags")
        and isinstance(parent, ast.Attribute)
        and parent.attr == "data"
    ):
        return target.attr
    return ""


def test_mlflow_names_are_spelled_only_in_the_tracking_package():
    assert [hit for p in OUTSIDE for hit in naming_literals(p)] == []


def test_the_name_check_catches_a_spelled_name(tmp_path):
    # The check above must be able to fail: a module that spells a tag and a param.
    bad = tmp_path / "spelled.py"
    bad.write_text(
        'def f(run, t):\n    run.set_tags({"soups.x": 1})\n    run.log_table(t, "scores.csv")\n'
        '    return run.data.params["lr"], run.data.metrics.get("val_loss")\n'
    )
    # the tag string, the literal key, the artifact path, the param and the metric read by name
    assert len(naming_literals(bad)) == 5


# The benchmarks and the tests are read as often as the library: the same limits hold there.
SIZED = CODE + sorted([*(ROOT / "bench").rglob("*.py"), *(ROOT / "tests").rglob("*.py")])


@pytest.mark.parametrize("path", SIZED, ids=rel)
def test_modules_and_functions_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{rel(path)} has {lines} lines"
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{rel(path)}:{node.lineno} {node.name} has {length} lines"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOUPS_MODULES = {module_name(p): p for p in (ROOT / "soups").rglob("*.py")}


def soups_imports(path: Path) -> set[str]:
    """The soups modules `path` imports, wherever the import stands (a function's body, a
    TYPE_CHECKING block): `from soups.x import name` is an arrow to soups.x, `from soups.x import
    submodule` to the submodule."""
    out = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in SOUPS_MODULES else node.module)
    return {m for m in out if m in SOUPS_MODULES and m != module_name(path)}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle_in_soups():
    """What two modules share lives below both (docs/ARCHITECTURE.md): a loop means neither can be
    read, tested or moved without the other."""
    graph = {m: soups_imports(p) for m, p in SOUPS_MODULES.items()}
    assert import_cycles(graph) == []


def test_the_cycle_check_finds_a_loop():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def step_of(module: str) -> str | None:
    """`soups.steps.soup.step` -> `soup`; None for the library and the tracking package."""
    parts = module.split(".")
    if parts[:2] != ["soups", "steps"]:
        return None
    return parts[2] if len(parts) > 2 else "(the steps package)"


def level_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} imports {dep}"
        for m, deps in sorted(graph.items())
        for dep in sorted(deps)
        if step_of(dep) and step_of(dep) != step_of(m)
    ]


def test_the_library_never_imports_a_step_and_a_step_never_imports_another():
    """Levels (docs/ARCHITECTURE.md): steps over the library and the tracking package. A step
    that drives another (a sweep trains and soups) gets it from its entry point as a function."""
    assert level_violations({m: soups_imports(p) for m, p in SOUPS_MODULES.items()}) == []


def test_the_level_check_finds_a_step_below_or_beside_another():
    graph = {
        "soups.data": {"soups.steps.soup.step"},
        "soups.models": {"soups.steps"},
        "soups.steps.sweep.step": {"soups.steps.finetune", "soups.steps.sweep.study", "soups.data"},
        "soups.steps.soup.step": {"soups.steps.soup.report"},
    }
    assert level_violations(graph) == [
        "soups.data imports soups.steps.soup.step",
        "soups.models imports soups.steps",
        "soups.steps.sweep.step imports soups.steps.finetune",
    ]


def test_imports_in_soups_are_absolute():
    """The import checks read absolute names; a relative import would slip past them."""
    relative = [
        f"{rel(p)}:{node.lineno}"
        for p in SOUPS_MODULES.values()
        for node in ast.walk(tree(p))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []


# Library modules that take a recipe, and why: the recipe is what they are about. (The tracking
# package beside the library is not checked: a run's start logs its recipe.)
RECIPE_READERS = {
    "soups.recipe": "the recipe itself, and where a step turns it into values (loader_settings, load_splits)",
    "soups.run_notes": "what a run says about the recipe it ran (its description, its data inputs)",
    "soups.starts": "`start: auto`: which start a recipe's model and split need, found or made",
}


def reads_recipes(path: Path) -> list[str]:
    """Where a module names `Recipe` or takes a parameter called `recipe`."""
    found = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Name) and node.id == "Recipe":
            found.append(f"{rel(path)}:{node.lineno} names Recipe")
        if isinstance(node, ast.ImportFrom) and any(a.name == "Recipe" for a in node.names):
            found.append(f"{rel(path)}:{node.lineno} imports Recipe")
        if isinstance(node, ast.arg) and node.arg == "recipe":
            found.append(f"{rel(path)}:{node.lineno} takes a recipe")
    return found


def test_the_recipe_check_finds_a_recipe_taken(tmp_path):
    taker = tmp_path / "taker.py"
    taker.write_text("from soups.recipe import Recipe\n\ndef f(recipe):\n    return recipe.img_size\n")
    assert len(reads_recipes(taker)) == 2
    (tmp_path / "values.py").write_text("def f(img_size: int, workers: int):\n    return img_size\n")
    assert reads_recipes(tmp_path / "values.py") == []


def test_the_library_takes_values_not_recipes():
    """Below the steps, functions take the values they use (image size, workers, augmentation,
    batch size), so they read and test alone; a step turns its recipe into those values once."""
    library = [
        p
        for m, p in SOUPS_MODULES.items()
        if not step_of(m) and m not in RECIPE_READERS and TRACKING not in p.parents
    ]
    assert [hit for p in library for hit in reads_recipes(p)] == []
