"""budgetlora: LoRA fine-tuning of frozen encoders under a hard trainable-parameter budget.

    import budgetlora
    run = budgetlora.train("configs/agnews-minilm-offline.yaml")
    run.predict(["Stocks rally as the Fed holds rates"]).labels

The API is loaded on first use, so `import budgetlora` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = {
    "train": "api",
    "resume": "api",
    "load": "api",
    "plan": "api",
    "sweep": "api",
    "Run": "api",
    "Predictions": "api",
    "BudgetLoraError": "errors",
    "OverBudgetError": "errors",
    "load_config": "config",
    "Config": "config",
}
__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f"budgetlora.{_API[name]}"), name)
    raise AttributeError(f"module 'budgetlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
