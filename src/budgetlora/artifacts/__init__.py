"""What a run leaves on disk: the run directory's schema (run_dir, no torch), where a run lives and
who may write it (placement, no torch), trained weights saved and loaded strictly (trained), merged
and ONNX exports (export), model cards (model_card).
Loaded lazily, so reading a run's files never imports torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_run_model": "trained",
    "save_trained_model": "trained",
    "TrainedModel": "trained",
    "write_run_card": "model_card",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"budgetlora.artifacts.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'budgetlora.artifacts' has no attribute {name!r}")
