"""Evaluation: inference (predict), the reported metrics (metrics) and the significance tests
that compare runs (stats). Loaded lazily: `stats` and `metrics` need no torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "classification_metrics": "metrics",
    "cross_entropy": "metrics",
    "format_metrics": "metrics",
    "softmax": "metrics",
    "evaluate_split": "predict",
    "predict_logits": "predict",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"budgetlora.evaluate.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'budgetlora.evaluate' has no attribute {name!r}")
