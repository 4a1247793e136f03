"""Typed reads out of a JSON mapping that budgetlora wrote and reads back (summary.json and the
records beside it): each value checked for its type and range, the first bad one named with its
file and key and called damage. No torch."""

from __future__ import annotations

import math
from typing import Any, Optional

from budgetlora.errors import BudgetLoraError


class Checker:
    """Reads typed values out of a JSON mapping, naming the file and key of the first bad one."""

    def __init__(self, data: Any, where: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise BudgetLoraError(
                f"{where}: {prefix.rstrip('.') or 'the file'} is not a JSON object; the file is damaged"
            )
        self.data, self.where, self.prefix = data, where, prefix

    def fail(self, key: str, what: str) -> BudgetLoraError:
        return BudgetLoraError(
            f"{self.where}: {self.prefix}{key} is not {what}; the file is damaged (train the run "
            "again, or restore the file)"
        )

    def number(
        self, key: str, low: float = -math.inf, high: float = math.inf, optional: bool = True, integer: bool = False
    ) -> Any:
        value = self.data.get(key)
        if value is None and optional:
            return None
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and low <= value <= high
            and (not integer or float(value).is_integer())
        )
        if not ok:
            raise self.fail(key, f"{'an integer' if integer else 'a number'} in its range")
        return int(value) if integer else float(value)

    def text(self, key: str, optional: bool = True) -> Optional[str]:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(key, "a string")
        return value

    def flag(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping")
        return value
