"""Training objectives by name. Each is a module called as objective(model, images, labels) ->
loss; extra trainable parts (the contrastive projection head) live here, never in the model's
state dict, so checkpoints and soups stay the plain model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from soups import SoupsError


class CrossEntropy(nn.Module):
    def __init__(self, label_smoothing: float = 0.0, **_):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)


class Focal(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, so that easy,
    frequent classes weigh less than the rare ones the competition's F1 rewards."""

    def __init__(self, label_smoothing: float = 0.0, focal_gamma: float = 2.0, **_):
        super().__init__()
        self.label_smoothing, self.gamma = label_smoothing, focal_gamma

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing)
        p_true = logits.float().softmax(1).gather(1, y[:, None]).squeeze(1)
        return ((1 - p_true).pow(self.gamma) * ce).mean()


def supcon(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one view per image: each embedding is
    pulled towards the batch's other embeddings of its class. Anchors with no positive are skipped."""
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(y), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positives = (y[:, None] == y[None, :]) & ~self_mask
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    count = positives.sum(1)
    has = count > 0
    if not has.any():
        return z.sum() * 0.0
    mean_pos = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)[has] / count[has]
    return -mean_pos.mean()


class SupConPlusCE(nn.Module):
    """Cross-entropy on the classifier plus `supcon_weight` x SupCon on a projection head over the
    model's pooled features (timm's forward_head(pre_logits=True))."""

    def __init__(self, label_smoothing: float = 0.0, supcon_weight: float = 0.1, num_features: int = 0, **_):
        super().__init__()
        self.label_smoothing, self.weight = label_smoothing, supcon_weight
        self.projection = nn.Sequential(
            nn.Linear(num_features, num_features), nn.ReLU(), nn.Linear(num_features, 128)
        )

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.get_classifier()(features)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return ce + self.weight * supcon(self.projection(features), y)


LOSSES = {"cross_entropy": CrossEntropy, "focal": Focal, "supcon": SupConPlusCE}


def objective(name: str, model: nn.Module, **options) -> nn.Module:
    if name not in LOSSES:
        raise SoupsError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[name](num_features=getattr(model, "num_features", 0), **options)
