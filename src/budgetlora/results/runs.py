"""Finished runs as records: summary, flattened config, metrics and per-row test outcomes, read
only through the run directory's schema (artifacts.run_dir). No torch: tables and reports can be
built on a machine that never trained anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.summary import PrunedRecord, RunSummary, SplitMetrics
from budgetlora.config import flatten, read_yaml
from budgetlora.errors import BudgetLoraError

MAX_DEPTH = 3


@dataclass
class RunRecord:
    """One finished run directory (its summary), or a trial a sweep pruned (its pruning record:
    the step it reached, why, its validation accuracy there; no summary, no test results);
    loaded lazily beyond summary and config."""

    path: Path
    label: str
    summary: Optional[RunSummary]
    pruned: Optional[PrunedRecord] = None
    config: dict[str, Any] = field(default_factory=dict)  # flattened to dotted keys

    @property
    def test(self) -> Optional[SplitMetrics]:
        test = self.summary.test if self.summary is not None else None
        return test if test is not None and test.n else None

    @property
    def val(self) -> Optional[SplitMetrics]:
        val = self.summary.val if self.summary is not None else None
        return val if val is not None and val.n else None

    @property
    def val_acc(self) -> Optional[float]:
        """The best evaluation's validation accuracy (a pruned trial's: at the step it stopped)."""
        if self.summary is not None:
            return self.summary.val_acc
        return self.pruned.val_acc if self.pruned is not None else None

    @property
    def best_step(self) -> Optional[int]:
        if self.summary is not None:
            return self.summary.best_step
        return self.pruned.step if self.pruned is not None else None

    @property
    def trainable_params(self) -> Optional[int]:
        if self.summary is not None:
            return self.summary.trainable_params
        return self.pruned.trainable_params if self.pruned is not None else None

    @property
    def train_time_s(self) -> Optional[float]:
        return self.summary.train_time_s if self.summary is not None else None

    @property
    def samples_per_s(self) -> Optional[float]:
        return self.summary.samples_per_s if self.summary is not None else None

    @property
    def label_names(self) -> list[str]:
        return list(self.summary.label_names) if self.summary is not None else []

    @cached_property
    def metrics(self) -> list[dict[str, Any]]:
        return rd.read_metrics(self.path / rd.METRICS)

    @cached_property
    def val_outcomes(self) -> pd.Series | None:
        """Per-row correctness of the final model on the validation rows (None when not saved)."""
        return _read_outcomes(self.path / rd.VAL_PREDICTIONS)

    @cached_property
    def test_outcomes(self) -> pd.Series | None:
        """Per-row correctness indexed by test ID, or None when no usable predictions file."""
        return _read_outcomes(self.path / rd.PREDICTIONS)

    @cached_property
    def val_cells(self) -> pd.DataFrame | None:
        """The validation predictions file's label and pred cells indexed by ID (None when not saved)."""
        return _read_cells(self.path / rd.VAL_PREDICTIONS)

    @cached_property
    def test_cells(self) -> pd.DataFrame | None:
        return _read_cells(self.path / rd.PREDICTIONS)


def _read_config(run: Path) -> dict[str, Any]:
    # A run without a readable config is still worth listing; it just has no config columns.
    if not (run / rd.CONFIG).is_file():
        return {}
    try:  # as written, not validated: a run of an older version still shows its settings
        return flatten(read_yaml(run / rd.CONFIG))
    except BudgetLoraError:
        return {}


def _read_cells(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        # Strings throughout: IDs like "007" must not become 7, and label/pred compare as text.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    if not {"ID", "label", "pred"} <= set(frame.columns) or frame["ID"].duplicated().any():
        return None
    return frame.set_index("ID")[["label", "pred"]]


def _read_outcomes(path: Path) -> pd.Series | None:
    frame = _read_cells(path)
    if frame is None:
        return None
    return pd.Series((frame["label"] == frame["pred"]).to_numpy(), index=frame.index.to_numpy())


def read_run(path: str | Path, label: str | None = None) -> RunRecord:
    """A finished run, or a trial a sweep pruned (its summary then says where and why)."""
    path = Path(path)
    if not path.is_dir():
        raise BudgetLoraError(f"run directory not found: {path}")
    pruned = rd.read_pruned(path)
    if not rd.is_finished(path) and pruned is None:
        raise BudgetLoraError(f"{path} is not a finished run (no {rd.SUMMARY})")
    summary = rd.read_summary(path) if pruned is None else None
    return RunRecord(path=path, label=label or path.name, summary=summary, pruned=pruned, config=_read_config(path))


def _settled(path: Path) -> bool:
    return rd.is_finished(path) or (path / rd.PRUNED).is_file()


def _find_run_dirs(root: Path, max_depth: int) -> list[Path]:
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            # Hidden folders include the staging and temp leftovers of runs still being written.
            if child.name.startswith(".") or child.name in rd.INNER_DIRS:
                continue
            if _settled(child):
                found.append(child)
            elif depth < max_depth:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def collect_runs(root: str | Path, max_depth: int = MAX_DEPTH) -> list[RunRecord]:
    """Every run under root: root itself if it is a run, else subfolders up to max_depth deep.

    Labels are paths relative to root so that two sweeps' "r8" runs stay distinguishable.
    """
    root = Path(root)
    if not root.is_dir():
        raise BudgetLoraError(f"directory not found: {root}")
    if _settled(root):
        return [read_run(root)]
    dirs = _find_run_dirs(root, max_depth)
    if not dirs:
        raise BudgetLoraError(f"no runs found in {root} (no {rd.SUMMARY} up to {max_depth} levels deep)")
    return [read_run(d, d.relative_to(root).as_posix()) for d in dirs]
