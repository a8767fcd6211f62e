"""Learned soup (Wortsman et al. 2022, "Model soups", learned soup): per-layer mixing weights of
the ingredients, trained by gradient descent on held-out images through the mixed model.

It fits on part of the held-out set and is scored on the rest only, so its accuracy is never
measured on the images it was fitted on. It holds every ingredient at once: memory grows with N."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from soups import SoupsError
from soups.data import model_input
from soups.options import option
from soups.soup.core import RunningAverage, SoupResult, StateDict, Step, no_usable, usable
from soups.soup.registry import Kitchen, register

MIB = 2**20
SPLIT_SEED = 0  # which held-out images fit and which score: fixed, so that a rerun scores the same


def layer_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def load_all(kitchen: Kitchen, max_mb: int) -> tuple[list[StateDict], list[str], list[Step]]:
    """Every usable ingredient, in memory at once, refusing past `max_mb` MiB in all."""
    reference, states, names, steps, total = RunningAverage(), [], [], [], 0
    for rank, name, state in usable(kitchen.candidates, reference, steps):
        if not reference.count:
            reference.add(state)  # only to check that the next ones fit
        size = sum(v.numel() * v.element_size() for v in state.values())
        total += size
        if total > max_mb * MIB:
            raise SoupsError(
                f"learned soup: {len(states) + 1} ingredients of {size / MIB:.0f} MiB each exceed "
                f"learned_max_mb={max_mb}; lower max_candidates or raise learned_max_mb"
            )
        states.append(state)
        names.append(name)
        steps.append(Step(rank, name, "kept", "mixed", None))
    if not states:
        raise no_usable(steps)
    return states, names, steps


def bn_in_train_mode(model: nn.Module) -> None:
    """Eval mode (no dropout) but BatchNorm on batch statistics: the mixed running statistics are
    wrong until recalibrated, so fitting the mix against them would fit their error."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


def fit_mix(scorer, states: list[StateDict], epochs: int, lr: float) -> tuple[torch.Tensor, list[str], float]:
    """Per-layer softmax weights over the ingredients (N × layers), starting from the uniform soup."""
    device, model = scorer.device, scorer.model
    keys = [k for k in states[0] if states[0][k].is_floating_point()]
    layers = sorted({layer_of(k) for k in keys})
    column = {k: layers.index(layer_of(k)) for k in keys}
    params = {n for n, _ in model.named_parameters()}
    stacked = {k: torch.stack([s[k].float() for s in states]).to(device) for k in keys if k in params}
    logits = torch.zeros(len(states), len(layers), device=device, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    model.load_state_dict(states[0])
    bn_in_train_mode(model)
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for images, labels in scorer.held_out.batches(scorer.batch_size):
            weights = logits.softmax(0)
            mixed = {k: torch.einsum("n,n...->...", weights[:, column[k]], v) for k, v in stacked.items()}
            x = model_input(images.to(device), scorer.mean, scorer.std)
            loss = F.cross_entropy(functional_call(model, mixed, (x,)), labels.to(device).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
    model.eval()
    return logits.detach().softmax(0).cpu(), layers, loss_sum / max(seen, 1)


def mix(states: list[StateDict], weights: torch.Tensor, layers: list[str]) -> StateDict:
    out = {}
    for k, v in states[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        w = weights[:, layers.index(layer_of(k))].double()
        out[k] = sum(w[i] * s[k].double() for i, s in enumerate(states)).to(v.dtype)
    return out


@dataclass(frozen=True)
class LearnedOptions:
    learned_epochs: int = option(5, "learned: passes over the fitting part of val.")
    learned_lr: float = option(0.05, "learned: Adam learning rate of the mixing weights.")
    learned_fit_share: float = option(0.5, "learned: share of val it fits on; it is scored on the rest.")
    learned_max_mb: int = option(
        4096,
        "learned: holds every ingredient at once (about N + 3 models' weights plus one batch of "
        "activations: 16 demo models take ~0.2 GiB, 16 resnet50 ~1.6 GiB); refuse beyond this many "
        "MiB of ingredients.",
    )


@register(
    "learned",
    "per-layer mixing weights trained by gradient descent on half of val, scored on the other half",
    "Wortsman et al. 2022, Model soups, learned soup: https://arxiv.org/abs/2203.05482",
    options=LearnedOptions,
    streams=False,
)
def cook(
    kitchen: Kitchen, learned_epochs: int, learned_lr: float, learned_fit_share: float, learned_max_mb: int
) -> SoupResult:
    scorer = kitchen.scorer
    n_fit = int(round(learned_fit_share * scorer.size))
    if not 0 < n_fit < scorer.size:
        raise SoupsError(
            f"learned_fit_share={learned_fit_share} leaves no images to fit on or to score on "
            f"({scorer.size} val images)"
        )
    states, names, steps = load_all(kitchen, learned_max_mb)
    order = torch.randperm(scorer.size, generator=torch.Generator().manual_seed(SPLIT_SEED))
    # The fitting part stays in its shuffled order: val lists images class by class, and batches
    # of one class fit the mix to that class (fit loss 1.25 in class order, 0.23 shuffled on a toy set).
    scored_on = order[n_fit:].sort().values
    fit, held = scorer.subset(order[:n_fit]), scorer.subset(scored_on)
    best = held.correct(states[0])
    if len(states) == 1:
        return SoupResult(states[0], names, steps, best, best, held.size, False, scored_on=scored_on)
    weights, layers, loss = fit_mix(fit, states, learned_epochs, learned_lr)
    soup = mix(states, weights, layers)
    share = weights.mean(1)
    for step, w in zip([s for s in steps if s.accepted], share.tolist(), strict=True):
        step.reason = f"mean weight {w:.3f}"
    correct = held.correct(soup)
    details = {"fit_images": n_fit, "fit_loss": loss}
    return SoupResult(
        soup, names, steps, best, correct, held.size, True, details=details, scored_on=scored_on
    )
