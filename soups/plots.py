"""Figures people would rather look at than read (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def soup_curve(result, x_label: str, ingredient_val: list[float | None], uniform_val: float | None):
    """A soup method's own curve (greedy: the soup's held-out accuracy after each candidate
    considered, with each candidate's own; WiSE-FT: accuracy against the mix), or, for a method
    without one, the soup's accuracy beside each ingredient's."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if result.curve:
        xs, ys = zip(*[(x, c / result.held_out) for x, c in result.curve], strict=True)
        ax.step(xs, ys, where="post", color="C0", marker=".", label="soup")
    else:
        ax.axhline(result.accuracy, color="C0", label="soup")
    # A method that chooses on part of val (greedy's split rule, learned) has its curve on those
    # images: the ingredients' own val (all of val) and the uniform soup's would not compare.
    part = getattr(result, "scored_on", None) is not None
    by_rank = "candidates" in x_label and not part
    for s, own in zip(result.steps, ingredient_val, strict=True):
        if own is not None and by_rank:
            ax.scatter(
                s.rank, own, marker="o" if s.accepted else "x", color="C2" if s.accepted else "C3", zorder=3
            )
    if by_rank:
        ax.scatter([], [], marker="o", color="C2", label="ingredient kept")
        ax.scatter([], [], marker="x", color="C3", label="ingredient not kept / skipped")
    elif part:
        ax.axhline(result.best_accuracy, color="C2", linestyle=":", label="top-ranked run, same images")
    else:
        best = max((v for v in ingredient_val if v is not None), default=None)
        if best is not None:
            ax.axhline(best, color="C2", linestyle=":", label="best ingredient")
    if uniform_val is not None and not part:
        ax.axhline(uniform_val, color="C1", linestyle="--", label="uniform soup")
    ax.set(xlabel=x_label, ylabel="val accuracy", title="Soup")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def val_vs_test(ingredients: list[tuple[float, float]], soups: dict[str, tuple[float, float]]):
    """Each ingredient's val vs test accuracy, soups marked (the model-soups paper's figure)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if ingredients:
        v, t = np.array(ingredients).T
        ax.scatter(v, t, color="grey", alpha=0.7, label="ingredients")
    for (name, (v, t)), marker in zip(soups.items(), ["*", "D", "s", "^"], strict=False):
        ax.scatter(v, t, marker=marker, s=160, label=name, zorder=3)
    ax.set(xlabel="val accuracy", ylabel="test accuracy", title="Ingredients and soups")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_matrix(cm: np.ndarray, classes: list[str], title: str):
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 2), max(4.5, 0.45 * n + 1.5)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def misclassified(
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    per_class: int = 3,
    cap: int = 36,
):
    """The most confidently wrong held-out images, up to `per_class` for each true class and `cap`
    in all, titled true -> predicted (confidence). None when nothing is wrong."""
    preds = probs.argmax(1)
    confidence = probs.max(1)
    picked = []
    for c in range(len(classes)):
        wrong = np.flatnonzero((labels == c) & (preds != c))
        picked += wrong[np.argsort(-confidence[wrong])][:per_class].tolist()
    picked = sorted(picked, key=lambda j: -confidence[j])[:cap]
    if not picked:
        return None
    cols = min(6, len(picked))
    rows = -(-len(picked) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, j in zip(axes.flat, sorted(picked, key=lambda j: (labels[j], -confidence[j])), strict=False):
        ax.imshow(images[j])
        ax.set_title(f"{classes[labels[j]]}\n-> {classes[preds[j]]} ({confidence[j]:.2f})", fontsize=7)
    fig.suptitle("Most confident mistakes (true -> predicted)", fontsize=9)
    fig.tight_layout()
    return fig
