"""Database files budgetlora creates or joins: a sweep's Optuna storage (SQLite or a journal file)
and MLflow's SQLite store. Never inside a run or an export (their folders are budgetlora's own
layout), and never a file of another kind: an existing file is joined only when it already is
such a store, so a user's own database or document is never written into."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from budgetlora.artifacts import run_dir as rd
from budgetlora.errors import BudgetLoraError

SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLES = frozenset({"studies", "trials"})
MLFLOW_TABLES = frozenset({"experiments", "runs"})


def _holder(path: Path) -> str | None:
    """The run or export a store path would lie inside, if any."""
    parent = Path(path).expanduser().absolute().parent
    run = rd.inside_run(parent) if parent.exists() else None
    if run is not None:
        return f"the run {run}"
    for folder in (parent, *parent.parents):
        if (folder / rd.EXPORT_META).is_file():
            return f"the export {folder}"
    return None


def sqlite_tables(path: Path) -> set[str] | None:
    """The table names of the SQLite database at `path`, read-only; None if it is not one."""
    with open(path, "rb") as handle:
        if handle.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return None
    # Read-only first; a writer killed mid-transaction leaves a hot journal that only a writable
    # connection may roll back (what any SQLite client does on its next open), so then read-write.
    for mode in ("ro", "rw"):
        try:
            connection = sqlite3.connect(f"file:{Path(path).absolute()}?mode={mode}", uri=True, timeout=5)
            try:
                rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            finally:
                connection.close()
        except sqlite3.Error:
            continue
        return {str(name) for (name,) in rows}
    return None


def check_sqlite_store(path: Path, what: str, tables: frozenset[str], option: str) -> None:
    """Refuse a SQLite store path inside a run or an export, or an existing file that is not `what`."""
    path = Path(path).expanduser()
    holder = _holder(path)
    if holder is not None:
        raise BudgetLoraError(f"{option} {path}: the {what} would be created inside {holder}; put it elsewhere")
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return
    if not path.is_file():
        raise BudgetLoraError(f"{option} {path}: exists and is not a file")
    found = sqlite_tables(path)
    if found is None or (found and not tables <= found):
        kind = (
            "not a SQLite database"
            if found is None
            else f"a SQLite database of something else (tables: {', '.join(sorted(found)[:6])})"
        )
        raise BudgetLoraError(
            f"{option} {path}: {kind}; budgetlora adds the {what} only to a new file or to an "
            f"existing {what}: give another path"
        )


def check_journal_store(path: Path, option: str) -> None:
    """Refuse a journal path inside a run or an export, or an existing file that is not an Optuna
    journal (JSON lines with an `op_code`), before anything is appended to it."""
    import json

    path = Path(path).expanduser()
    holder = _holder(path)
    if holder is not None:
        raise BudgetLoraError(f"{option} {path}: the Optuna journal would be created inside {holder}; put it elsewhere")
    if not path.exists():
        return
    if not path.is_file():
        raise BudgetLoraError(f"{option} {path}: exists and is not a file")
    with open(path, "rb") as handle:
        first = handle.readline(1 << 20)
    if not first.strip():
        return
    try:
        record = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise BudgetLoraError(
            f"{option} {path}: not an Optuna journal file (its first line is not a journal "
            "record); budgetlora appends only to a new file or an existing journal: give another "
            "path"
        )
