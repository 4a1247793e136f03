"""The final model's evaluation: outputs on the validation and test splits, the decisions tuned on
validation (a temperature, per-label thresholds; none when `train.calibrate` is off or there is no
validation split), and each split scored under them. Test outputs never influence the decisions."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch import nn

from budgetlora.artifacts.summary import SplitMetrics
from budgetlora.config import PredictionBatch
from budgetlora.data.prepare import Prepared
from budgetlora.evaluate.calibration import tune_decisions
from budgetlora.evaluate.predict import predict_logits
from budgetlora.evaluate.scoring import score_split
from budgetlora.progress import Console
from budgetlora.runtime import Runtime
from budgetlora.task import Decisions, LabelSpace


@dataclass
class Evaluated:
    metrics: SplitMetrics
    answers: np.ndarray


@dataclass
class FinalEvaluation:
    decisions: Decisions
    splits: dict[str, Optional[Evaluated]]


def final_evaluation(
    model: nn.Module,
    prepared: Prepared,
    space: LabelSpace,
    tune: bool,
    rt: Runtime,
    pad_id: int,
    batch: PredictionBatch,
    console: Console,
) -> FinalEvaluation:
    outputs: dict[str, Optional[np.ndarray]] = {}
    for name in ("val", "test"):
        data = getattr(prepared, name)
        rows = len(data) if data is not None and data.labels is not None else 0
        with console.task(f"evaluating {name}", rows) if rows else contextlib.nullcontext() as task:
            outputs[name] = (
                predict_logits(model, data, rt, pad_id, batch, progress=task.advance if task else None)
                if rows
                else None
            )
    val_outputs, val_labels = outputs["val"], prepared.val.labels if prepared.val is not None else None
    decisions = Decisions.default(space)
    if tune and val_outputs is not None and val_labels is not None:
        decisions, _ = tune_decisions(space, val_outputs, val_labels)
        decisions = Decisions(
            decisions.task,
            decisions.width,
            decisions.temperature,
            decisions.thresholds,
            decisions.tuned,
            space.target_std,
            space.target_mean,
            notes=decisions.notes,
        )
    splits: dict[str, Optional[Evaluated]] = {}
    for name in ("val", "test"):
        data, logits = getattr(prepared, name), outputs[name]
        if logits is None or data is None or data.labels is None:
            splits[name] = None
            continue
        metrics, answers = score_split(space, decisions, logits, data.labels)
        splits[name] = Evaluated(SplitMetrics.from_dict(metrics, name), answers)
    return FinalEvaluation(decisions, splits)
