"""JSON read back from disk (files budgetlora wrote, which anyone may have edited since), bounded:
a size cap checked before reading, nesting that would exhaust the parser's recursion refused,
and no NaN, Infinity or number that overflows to infinity (JSON has none; budgetlora never
writes one, so its presence means damage). Every failure is one BudgetLoraError naming the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from budgetlora.errors import BudgetLoraError

MAX_JSON_BYTES = 256 * 2**20  # far above any file budgetlora writes (rung records of 100k-row validations)


MAX_JSON_INT = 2**63  # larger integers are damage: no count or step budgetlora writes comes near
MAX_INT_DIGITS, SHOWN = 19, 24  # 2**63 has 19 digits; how much of a refused number a message shows


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS or abs(int(text)) >= MAX_JSON_INT:
        raise ValueError(f"the integer {text[:SHOWN]}{'...' if len(text) > SHOWN else ''} is too large")
    return int(text)


def _first_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads(text: str, where: str) -> Any:
    """Parse `text` (from `where`, a file or file:line for messages)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_int=_bounded_int)
    except RecursionError:
        raise BudgetLoraError(f"{where}: JSON nested too deeply to read; the file is damaged") from None
    except ValueError as exc:
        raise BudgetLoraError(f"{where}: not valid JSON ({str(exc)[:120]}); the file is damaged") from None
    if _first_non_finite(value):
        raise BudgetLoraError(f"{where}: holds a number that is not finite; the file is damaged")
    return value


def read_text(path: Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The file's UTF-8 text, after its size was checked against `max_bytes`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise BudgetLoraError(
                f"{path}: {size:,} bytes, more than the {max_bytes:,} this file may have; "
                "the file is damaged or not budgetlora's"
            )
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BudgetLoraError(f"{path}: not UTF-8 text; the file is damaged") from None


def read(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of the file at `path` (FileNotFoundError and other OSErrors pass through)."""
    return loads(read_text(path, max_bytes), str(path))


def read_text_lenient(path: Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A line-oriented log's text (metrics.jsonl): size-checked, undecodable bytes replaced, so the
    lines that parse are kept."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise BudgetLoraError(
            f"{path}: {size:,} bytes, more than the {max_bytes:,} this file may have; "
            "the file is damaged or not budgetlora's"
        )
    with open(path, "rb") as handle:
        return handle.read(max_bytes + 1).decode("utf-8", errors="replace")
