"""Soup methods over state dicts, one small file each, in one registry. No MLflow here.

Adding a method: a file here that decorates its `cook(kitchen, **params)` with `@register(...)`
(its parameters a dataclass of `soups.options.option` fields),
one import line below, and it is an option of the soup step, a param of its run and a row of
its table (tests/test_soup_methods.py runs every registered method on tiny timm models)."""

from soups.soup import greedy, learned, model_stock, uniform, wise_ft  # noqa: F401  (each registers itself)
from soups.soup.core import Candidate, RunningAverage, Score, SoupResult, StateDict, Step, uniform_soup
from soups.soup.greedy import TIE_RULES, greedy_soup
from soups.soup.registry import METHODS, HeldOut, Kitchen, SoupMethod, all_params, method, register

__all__ = [
    "METHODS",
    "TIE_RULES",
    "Candidate",
    "HeldOut",
    "Kitchen",
    "RunningAverage",
    "Score",
    "SoupMethod",
    "SoupResult",
    "StateDict",
    "Step",
    "all_params",
    "greedy_soup",
    "method",
    "register",
    "uniform_soup",
]
