"""The training loss of each task: cross-entropy or focal loss over classes (single-label), per-label
binary cross-entropy or its focal form (multi-label), MSE or Huber on standardised targets
(regression); class weights from `train.class_weights` (inverse frequency for `balanced`; for
multi-label, positives weighted by negatives / positives). Each loss is a module of tensors only,
so the compiled training step captures it whole."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from budgetlora.config import TrainConfig
from budgetlora.data.sources import brief_names
from budgetlora.errors import BudgetLoraError
from budgetlora.task import MULTI, POSITIVE, REGRESSION, SINGLE

MAX_POSITIVE_WEIGHT = 100.0  # `balanced` multi-label: a label with 1 positive in 40,000 rows is not weighted 40,000x
HUBER_DELTA = 1.0  # in standard deviations of the target (targets are standardised)


def class_weights(cfg: TrainConfig, task: str, names: Sequence[str], labels: np.ndarray) -> Optional[np.ndarray]:
    """One weight per class (single-label) or per label's positives (multi-label); None for none."""
    setting = cfg.class_weights
    if setting == "none" or task == REGRESSION:
        return None
    if setting == "balanced":
        if task == SINGLE:
            counts = np.bincount(labels, minlength=len(names)).astype(np.float64)
            return len(labels) / (len(names) * np.maximum(counts, 1))
        positives = labels.sum(0).astype(np.float64)
        return np.clip((len(labels) - positives) / np.maximum(positives, 1), 1.0, MAX_POSITIVE_WEIGHT)
    unknown = [name for name in setting if name not in names]
    if unknown:
        raise BudgetLoraError(
            f"config key 'train.class_weights': unknown class(es) {brief_names(unknown)}; the classes are "
            f"{brief_names(names)}"
        )
    return np.array([setting.get(name, 1.0) for name in names], dtype=np.float64)


class FocalLoss(nn.Module):
    """Cross-entropy scaled by (1 - p_true)^gamma (Lin et al. 2017): easy rows count less."""

    def __init__(self, gamma: float, weight: Optional[torch.Tensor]):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=-1)
        true_log = log_probs.gather(1, labels[:, None]).squeeze(1)
        loss = -((1 - true_log.exp()) ** self.gamma) * true_log
        if self.weight is None:
            return loss.mean()
        row_weight = self.weight[labels]
        return (loss * row_weight).sum() / row_weight.sum()


class BinaryLoss(nn.Module):
    """Per-label binary cross-entropy, mean over rows and labels; with gamma > 0 its focal form."""

    def __init__(self, gamma: float, pos_weight: Optional[torch.Tensor]):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=self.pos_weight, reduction="none")
        if self.gamma:
            probs = torch.sigmoid(logits)
            p_true = probs * labels + (1 - probs) * (1 - labels)
            loss = loss * (1 - p_true) ** self.gamma
        return loss.mean()


def loss_function(cfg: TrainConfig, task: str = SINGLE, weights: Optional[np.ndarray] = None) -> nn.Module:
    """The loss module for `task` (`train.loss: auto` picks the task's usual one)."""
    weight = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    if task == REGRESSION:
        return nn.HuberLoss(delta=HUBER_DELTA) if cfg.loss == "huber" else nn.MSELoss()
    if task == MULTI:
        return BinaryLoss(cfg.focal_gamma if cfg.loss == "focal" else 0.0, weight)
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def train_hits(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows answered right, for the training log: the argmax class, or every label at 0.5
    (multi-label subset accuracy); regression has none (0)."""
    if task == SINGLE:
        return (logits.argmax(-1) == labels).sum()
    if task == MULTI:
        return ((logits > 0) == (labels > POSITIVE)).all(-1).sum()
    return torch.zeros((), dtype=torch.long, device=logits.device)
