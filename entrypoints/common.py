"""What every entry point shares: the recipe options and turning a user's mistake into one line."""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from soups import SoupsError, distributed, one_line
from soups.options import cli_fields, cli_name
from soups.recipe import OPTION_FIELDS
from soups.soup import all_params

DEFAULT_RECIPE = "configs/demo.yaml"


_TYPES = {bool: click.BOOL, int: click.INT, float: click.FLOAT, str: click.STRING}


def recipe_options(*names: str) -> Callable[[Callable], Callable]:
    """Add `--recipe` and one option per recipe field (all, or those named), named as in the
    recipe and in MLflow's `-P key=value`, which `mlflow run` appends as `--key value`. Options
    left out keep the recipe's value."""
    return lambda command: _add_recipe_options(command, names)


def _add_recipe_options(command: Callable, names: tuple[str, ...]) -> Callable:
    for f in reversed([f for f in OPTION_FIELDS if not names or f.name in names]):
        kind = _TYPES[type(f.default)]
        choices = f.metadata.get("choices")
        command = click.option(
            f"--{f.name}",
            type=click.Choice(choices) if choices else kind,
            default=None,
            help=f"{f.metadata['help']} [built-in: {f.default!r}; the recipe may set it]",
        )(command)
    return click.option(
        "--recipe",
        default=DEFAULT_RECIPE,
        show_default=True,
        type=click.Path(dir_okay=False),
        help="Recipe YAML: dataset, model, pretrained weights and the sweep's search space.",
    )(command)


def step_options(cls) -> Callable[[Callable], Callable]:
    """One option per command-line field of a step's options class, with its declared default,
    choices and help."""

    def add(command: Callable) -> Callable:
        for f in reversed(cli_fields(cls)):
            choices = f.metadata.get("choices")
            command = click.option(
                f"--{cli_name(f)}",
                f.name,
                type=click.Choice([str(c) for c in choices]) if choices else _TYPES[type(f.default)],
                default=f.default,
                show_default=f.default != "",
                help=f.metadata["help"],
            )(command)
        return command

    return add


def step_values(cls, options: dict[str, Any], **extra: Any):
    """The step's options object from the parsed command line, taking its fields out of `options`
    (what remains are the recipe options)."""
    return cls(**{f.name: options.pop(f.name) for f in cli_fields(cls)}, **extra)


def method_options() -> Callable[[Callable], Callable]:
    """One option per parameter of every registered soup method, declared once in its file."""

    def add(command: Callable) -> Callable:
        for f in reversed(all_params()):
            choices = f.metadata.get("choices")
            kind = click.Choice([str(c) for c in choices]) if choices else _TYPES[type(f.default)]
            command = click.option(
                f"--{cli_name(f)}",
                f.name,
                type=kind,
                default=None,
                help=f"{f.metadata['help']} [default: {f.default}]",
            )(command)
        return command

    return add


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually passed."""
    return {k: v for k, v in values.items() if v is not None}


@functools.cache  # once per process, however many steps it runs
def freeze_at_exit() -> None:
    """A step's process ends holding torch, timm and MLflow, and Python's teardown then searches
    their half-million objects for reference cycles: 1.5 s of a tiny fine-tune's 6 s here
    (bench/step_process.py). Objects frozen once the exit handlers registered later (MLflow's run
    end among them) have run are left out of that search: what they hold in reference cycles is
    freed by the OS, and their `__del__` does not run. So nothing in soups relies on `__del__` at
    exit: every file is written under `with`, every run ended explicitly."""
    atexit.register(gc.freeze)


def run_cli(step: Callable[[], Any]) -> Any:
    """Run a step; a SoupsError becomes `Error: <one line>` and exit code 1, never a traceback."""
    freeze_at_exit()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "urllib3", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return step()
    except SoupsError as e:
        raise click.ClickException(one_line(e)) from None


def relaunch_if_parallel(nproc: int) -> None:
    """-P nproc=N: this very command again as N torchrun processes (which never relaunch)."""
    if nproc <= 1 or distributed.launched():
        return
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--nproc="):
            skip = False
            continue
        skip = a == "--nproc"
        if not skip:
            args.append(a)
    command = distributed.torchrun_command(nproc, sys.argv[0], args)
    sys.stdout.flush()
    os.execv(command[0], command)


def run_training(recipe: str, overrides: dict[str, Any], train: Callable[[Any], str]) -> str:
    """What `finetune` and `start` share: relaunch as torchrun processes for nproc > 1, resume a
    run, or `train` the recipe. Returns the run id ("" on ranks other than 0)."""
    from soups.recipe import load_recipe
    from soups.steps.finetune import TrainingOptions, resume

    opts = step_values(TrainingOptions, overrides)
    if opts.nproc > 1 and not opts.resume and not distributed.launched():
        # A mistake in the recipe or the data is one line here, not N ranks' tracebacks under torchrun.
        from soups.recipe import load_splits

        run_cli(lambda: load_splits(load_recipe(recipe, overrides)))
    relaunch_if_parallel(opts.nproc)
    if opts.resume:
        return run_cli(lambda: resume(opts.resume, given(overrides)))
    return run_cli(lambda: train(load_recipe(recipe, overrides)))
