"""Labels beyond one class per row: multi-label sets (one column of names or ids joined by a
separator, a JSON list, or one 0/1 column per class) and regression targets (one or more numeric
columns), each checked row by row with the file and line named. Single-label classes are read by
`dataset.map_labels`; `wrong_task_hint` says when the data looks like another task's."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Optional, Sequence

import numpy as np

from budgetlora.config import DataConfig
from budgetlora.config.schema import MIN_CLASSES
from budgetlora.data.sources import Row, brief, brief_name, brief_names
from budgetlora.errors import BudgetLoraError

MAX_NUMBER_CHARS = 40  # a number written longer is not a number a person wrote
MAX_LABELS = 100_000  # distinct labels of one multi-label column
_INDEX = re.compile(r"-?\d{1,18}")
_TRUE = {"1", "1.0", "true", "True", "TRUE", "yes"}
_FALSE = {"0", "0.0", "false", "False", "FALSE", "no", ""}


def _field(row: Row, column: str, key: str) -> Any:
    if column not in row.fields:
        raise BudgetLoraError(
            f"{row.where}: no label column '{column}' (columns: {brief_names(row.fields)}); set {key}"
        )
    return row.fields[column]


def _tokens(row: Row, value: Any, separator: str) -> list[Any]:
    """The labels of one multi-label cell: names or class indices (an empty cell: no label)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, bool) or not isinstance(value, (str, int, float, list)):
        raise BudgetLoraError(f"{row.where}: labels {brief(value)} are not names, ids or a list of them")
    items = value if isinstance(value, list) else [value]
    out: list[Any] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise BudgetLoraError(f"{row.where}: label {brief(item)} is not a class name or index")
        if isinstance(item, float):
            if not item.is_integer():
                raise BudgetLoraError(f"{row.where}: label {brief(item)} is not a class index")
            item = int(item)
        if isinstance(item, int):
            out.append(item)
            continue
        parts = item.split(separator) if not isinstance(value, list) else [item]
        for part in parts:
            part = unicodedata.normalize("NFC", part.strip())
            if part:
                out.append(int(part) if _INDEX.fullmatch(part) else part)
    return out


def multi_label_matrix(
    rows: Sequence[Row], cfg: DataConfig, names: Optional[list[str]], indices_ok: bool = True
) -> tuple[np.ndarray, list[str]]:
    """rows x classes float32 0/1 matrix and the class names (inferred when not given)."""
    if cfg.label_columns:
        return _indicator_columns(rows, cfg), list(cfg.label_columns)
    raw = [_tokens(row, _field(row, cfg.label_column, "data.label_column"), cfg.label_separator) for row in rows]
    if names is None:
        ints = {v for labels in raw for v in labels if isinstance(v, int)}
        strings = {v for labels in raw for v in labels if isinstance(v, str)}
        if ints and strings:
            bad = next(i for i, labels in enumerate(raw) if any(isinstance(v, str) for v in labels))
            raise BudgetLoraError(f"{rows[bad].where}: labels mix class names with integer ids")
        if ints and (min(ints) < 0 or max(ints) >= MAX_LABELS):
            raise BudgetLoraError(f"{rows[0].where}: label ids must be in 0..{MAX_LABELS - 1}; list the classes")
        names = [str(i) for i in range(max(ints) + 1)] if ints else sorted(strings)
        if len(names) > MAX_LABELS:
            raise BudgetLoraError(f"{len(names):,} distinct labels; at most {MAX_LABELS:,}")
        if len(names) < MIN_CLASSES:
            raise BudgetLoraError(
                f"{rows[0].where if rows else cfg.label_column}: fewer than two labels in the data; "
                "a multi-label classifier needs at least two"
            )
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(rows), len(names)), dtype=np.float32)
    for r, labels in enumerate(raw):
        for value in labels:
            if isinstance(value, int):
                if not indices_ok or not 0 <= value < len(names):
                    raise BudgetLoraError(
                        f"{rows[r].where}: label id {value} "
                        + (f"out of range 0..{len(names) - 1}" if indices_ok else "where the classes are names")
                    )
                matrix[r, value] = 1
            elif value in index:
                matrix[r, index[value]] = 1
            else:
                raise BudgetLoraError(
                    f"{rows[r].where}: unknown label {brief(value)} (separator {cfg.label_separator!r}); known: "
                    f"{brief_names(names)}"
                )
    return matrix, list(names)


def _indicator_columns(rows: Sequence[Row], cfg: DataConfig) -> np.ndarray:
    matrix = np.zeros((len(rows), len(cfg.label_columns)), dtype=np.float32)
    for r, row in enumerate(rows):
        for c, column in enumerate(cfg.label_columns):
            value = _field(row, column, "data.label_columns")
            text = str(value).strip() if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
            if value is True or text in _TRUE:
                matrix[r, c] = 1
            elif not (value is False or value is None or text in _FALSE):
                raise BudgetLoraError(
                    f"{row.where}: column '{brief_name(column)}' holds {brief(value)}; a label column of a "
                    "multi-label task holds 0 or 1"
                )
    return matrix


def _number(row: Row, column: str, value: Any) -> float:
    number: Optional[float] = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and len(value.strip()) <= MAX_NUMBER_CHARS:
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise BudgetLoraError(
            f"{row.where}: column '{brief_name(column)}' holds {brief(value)}, not a number; a regression "
            "target must be numeric (for class labels use task: single_label)"
        )
    if not math.isfinite(number):
        raise BudgetLoraError(
            f"{row.where}: column '{brief_name(column)}' holds {brief(value)}; a regression target must be "
            "a finite number (remove the row or fill the value in)"
        )
    return number


def regression_targets(rows: Sequence[Row], cfg: DataConfig) -> tuple[np.ndarray, list[str]]:
    """rows x targets float32 values, named by their columns."""
    columns = list(cfg.label_columns) or [cfg.label_column]
    key = "data.label_columns" if cfg.label_columns else "data.label_column"
    values = np.empty((len(rows), len(columns)), dtype=np.float64)
    for r, row in enumerate(rows):
        for c, column in enumerate(columns):
            values[r, c] = _number(row, column, _field(row, column, key))
    if np.abs(values).max(initial=0.0) > np.finfo(np.float32).max:
        raise BudgetLoraError(f"{rows[0].where}: a regression target is too large for float32")
    return values.astype(np.float32), columns


def check_scored_targets(labels: np.ndarray, names: list[str], where: str) -> None:
    """Pearson and Spearman (the regression objective) are undefined on targets that never vary."""
    columns = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    constant = [names[i] if i < len(names) else str(i) for i in np.flatnonzero(columns.std(0) == 0)]
    if constant:
        raise BudgetLoraError(
            f"{where}: the regression target(s) {brief_names(constant)} have one value in every row "
            f"({len(columns):,} row(s)): correlation with it is undefined; score on rows whose targets vary"
        )


def check_multi_label_training(matrix: np.ndarray, names: Sequence[str], where: str) -> None:
    """Every label needs positive training rows; data with exactly one label per row is single-label."""
    missing = [names[i] for i in np.flatnonzero(matrix.sum(0) == 0)]
    if missing:
        raise BudgetLoraError(
            f"{where}: {len(missing)} of {len(names)} labels have no positive training rows "
            f"({brief_names(missing)}); remove them from the class list or add rows"
        )
    if len(matrix) and (matrix.sum(1) == 1).all():
        raise BudgetLoraError(
            f"{where}: every training row has exactly one label: this is single-label data; use task: "
            "single_label (one softmax over the classes)"
        )


def wrong_task_hint(raw: Sequence[Any], separator: str = ",") -> str:
    """For a single-label column: whether it holds several labels joined by a separator (multi-label)."""
    strings = {v for v in raw if isinstance(v, str)}
    for value in strings:
        parts = [p.strip() for p in value.split(separator)]
        if len(parts) > 1 and all(p in strings for p in parts):
            return (
                f"; {brief(value)} looks like several labels joined by {separator!r}: for multi-label data "
                "set task: multi_label"
            )
    return ""
