"""The errors budgetlora raises on purpose. Everything else escaping to the CLI is a bug."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when the message is empty), for one-line errors."""
    lines = str(exc).splitlines()
    return (lines[0] if lines and lines[0].strip() else type(exc).__name__)[:limit]


class BudgetLoraError(Exception):
    """An error caused by user input or the environment: the CLI prints it as one line
    (`budgetlora: error: ...`) and exits 2; the Python API raises it as is."""


class OverBudgetError(BudgetLoraError):
    """The configured model has more trainable parameters than the budget allows."""

    def __init__(self, message: str, trainable: int, budget: int):
        super().__init__(message)
        self.trainable = trainable
        self.budget = budget


class RunDiverged(BudgetLoraError):
    """The training loss became NaN or infinite: the run is not resumable (it would diverge again)."""


class NotResumable(BudgetLoraError):
    """The run cannot continue from its checkpoints (none loads, or its data or config changed since
    they were written): training it again from the start loses nothing that could be kept."""


class RunBusy(BudgetLoraError):
    """Another process holds the run directory's lock."""


class WriteError(BudgetLoraError):
    """A file or directory could not be written (disk full, no permission); the previous
    version of `path`, if any, is intact."""

    def __init__(self, message: str, path: Optional[Path] = None):
        super().__init__(message)
        self.path = path


class RunInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; the CLI prints the message (which
    includes the resume command) and exits with `exit_code` (128 + the signal number)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunPruned(Exception):
    """A sweep's pruner stopped the run at an evaluation step (after its checkpoint was written):
    it was significantly behind the rung's leader. The run can be resumed to full length."""

    def __init__(self, step: int, reason: str, val_acc: float, run: str = ""):
        super().__init__(f"pruned at step {step}: {reason}")
        self.step, self.reason, self.val_acc, self.run = step, reason, val_acc, run


class RunPaused(Exception):
    """A sweep's successive halving stopped the run at a rung (after its checkpoint was written),
    until every trial has reached that rung; the run resumes from there if it survives."""

    def __init__(self, step: int, val_acc: float):
        super().__init__(f"paused at step {step}")
        self.step, self.val_acc = step, val_acc


EXIT_ERROR, EXIT_INTERRUPTED = 2, 130  # a refused input or the environment; Ctrl-C, as shells report it


def _report(message: str) -> None:
    # under torchrun every rank meets the same error: rank 0 alone says it, once
    if os.environ.get("RANK", "0") in ("", "0"):
        print(message, file=sys.stderr)


def run_reporting_errors(action: Callable[[], int]) -> int:
    """`action()`'s exit code, with budgetlora's errors as one line on stderr (exit 2), an
    interrupted run's message and signal exit code, and Ctrl-C as exit 130."""
    try:
        return action()
    except BudgetLoraError as exc:
        first, *rest = str(exc).split("\n")  # a multi-line error (a budget table) indents the rest
        _report("\n".join([f"budgetlora: error: {first}"] + [f"  {line}" for line in rest]))
        return EXIT_ERROR
    except RunInterrupted as exc:
        _report(f"budgetlora: {exc}")
        return exc.exit_code
    except OSError as exc:  # disk full, unwritable output: the environment, not a bug to trace
        where = f": {exc.filename}" if exc.filename else ""
        _report(f"budgetlora: error: {exc.strerror or exc}{where}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _report("budgetlora: interrupted")
        return EXIT_INTERRUPTED
