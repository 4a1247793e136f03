"""A finished run's summary (summary.json) as types: `RunSummary` with a `SplitMetrics` per
evaluated split, validated once when built (from the recipe or from disk), immutable after, with a
JSON round trip and a schema version. Every reader and writer of summary.json goes through here
(artifacts.run_dir.read_summary / write_summary); nothing else reads the file's keys. No torch.

summary.json (schema 2; schema 1, written before the version existed, has the same keys but
`compile` and `schema_version` and is read as well):

    name, mode, model, budget, trainable_params, total_params, breakdown {module kind: count},
    steps, total_steps, best_step, best_val_acc, stopped_early, final_train_loss, final_eval_loss,
    train_time_s, samples_per_s, wall_time_s, peak_memory_mb, device, precision, processes,
    label_names, truncation {split: {rows, truncated, ...}}, compile {widths, graphs, seconds,
    recompiles, failure} or null, val / test: {n, accuracy, correct, ci_low, ci_high, macro_f1,
    loss, per_class {class: {precision, recall, f1, support}}, confusion_matrix} or absent
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from budgetlora.errors import BudgetLoraError

SCHEMA_VERSION = 2
ACCURACY_SLACK = 1e-9  # float round-off between stored figures that must agree


class _Checker:
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


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class SplitMetrics:
    """Metrics of one labeled split: accuracy with n and its 95% Wilson interval, macro-F1, the
    mean cross-entropy, per-class precision / recall / F1 and the confusion matrix."""

    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    macro_f1: float
    correct: Optional[int] = None
    loss: Optional[float] = None
    per_class: dict[str, ClassMetrics] = field(default_factory=dict)
    confusion_matrix: Optional[list[list[int]]] = None

    @classmethod
    def from_dict(cls, data: Any, where: str, prefix: str = "") -> "SplitMetrics":
        c = _Checker(data, where, prefix)
        n = c.number("n", 0, optional=False, integer=True)
        correct = c.number("correct", 0, n, integer=True)
        per_class = {}
        for name, row in c.mapping("per_class").items():
            r = _Checker(row, where, f"{prefix}per_class.{name}.")
            per_class[str(name)] = ClassMetrics(
                r.number("precision", 0, 1, optional=False),
                r.number("recall", 0, 1, optional=False),
                r.number("f1", 0, 1, optional=False),
                r.number("support", 0, optional=False, integer=True),
            )
        matrix = data.get("confusion_matrix")
        if matrix is not None and not (
            isinstance(matrix, list)
            and all(
                isinstance(row, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row)
                for row in matrix
            )
        ):
            raise c.fail("confusion_matrix", "a matrix of counts")
        split = cls(
            n=n,
            accuracy=c.number("accuracy", 0, 1, optional=False),
            ci_low=c.number("ci_low", 0, 1, optional=False),
            ci_high=c.number("ci_high", 0, 1, optional=False),
            macro_f1=c.number("macro_f1", 0, 1, optional=False),
            correct=correct,
            loss=c.number("loss", 0),
            per_class=per_class,
            confusion_matrix=matrix,
        )
        if correct is not None and n and abs(split.accuracy - correct / n) > ACCURACY_SLACK:
            raise c.fail("accuracy", f"correct / n ({correct}/{n}), as it must be")
        if not split.ci_low - ACCURACY_SLACK <= split.accuracy <= split.ci_high + ACCURACY_SLACK:
            raise c.fail("accuracy", "inside its own confidence interval (ci_low..ci_high)")
        if matrix is not None and n and sum(map(sum, matrix)) != n:
            raise c.fail("confusion_matrix", f"a matrix of n = {n} counts")
        return split

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CompileRecord:
    """What compiling the training step cost (speedups.compile.CompileReport), as saved."""

    widths: list[int]
    graphs: int
    seconds: float
    recompiles: int
    failure: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "CompileRecord":
        c = _Checker(data, where, "compile.")
        widths = data.get("widths")
        if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
            raise c.fail("widths", "a list of widths")
        return cls(
            widths,
            c.number("graphs", 0, optional=False, integer=True),
            c.number("seconds", 0, optional=False),
            c.number("recompiles", 0, optional=False, integer=True),
            c.text("failure"),
        )


@dataclass(frozen=True)
class RunSummary:
    """summary.json of a finished run (see the module docstring for every field)."""

    name: str
    mode: str
    model: str
    trainable_params: int
    total_params: int
    budget: Optional[int]
    steps: int
    total_steps: int
    best_step: int
    label_names: list[str]
    device: str
    precision: str
    train_time_s: float
    samples_per_s: float
    wall_time_s: float
    peak_memory_mb: float
    processes: int = 1
    best_val_acc: Optional[float] = None
    stopped_early: bool = False
    final_train_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None
    breakdown: dict[str, int] = field(default_factory=dict)
    truncation: dict[str, dict[str, Any]] = field(default_factory=dict)
    val: Optional[SplitMetrics] = None
    test: Optional[SplitMetrics] = None
    compile: Optional[CompileRecord] = None
    schema_version: int = SCHEMA_VERSION

    @property
    def val_acc(self) -> Optional[float]:
        """The validation accuracy a sweep optimises: the best evaluation's, else the final one's."""
        if self.best_val_acc is not None:
            return self.best_val_acc
        return self.val.accuracy if self.val is not None else None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("val", "test", "compile"):
            if data[key] is None and key != "compile":
                del data[key]
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> "RunSummary":
        """Validate a summary read from disk (any schema up to SCHEMA_VERSION)."""
        c = _Checker(data, where)
        version = c.number("schema_version", 1, SCHEMA_VERSION, integer=True) or 1
        names = data.get("label_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise c.fail("label_names", "a list of class names")
        breakdown = c.mapping("breakdown")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in breakdown.values()):
            raise c.fail("breakdown", "a mapping of module kinds to counts")
        splits = {}
        for split in ("val", "test"):
            part = data.get(split)
            splits[split] = None if part is None else SplitMetrics.from_dict(part, where, f"{split}.")
        raw_compile = data.get("compile")
        return cls(
            name=c.text("name") or "",
            mode=c.text("mode") or "lora",
            model=c.text("model") or "",
            trainable_params=c.number("trainable_params", 0, optional=False, integer=True),
            total_params=c.number("total_params", 0, optional=False, integer=True),
            budget=c.number("budget", 1, integer=True),
            steps=c.number("steps", 0, optional=False, integer=True),
            total_steps=c.number("total_steps", 0, integer=True) or c.number("steps", 0, integer=True),
            best_step=c.number("best_step", 0, optional=False, integer=True),
            label_names=list(names),
            device=c.text("device") or "",
            precision=c.text("precision") or "",
            train_time_s=c.number("train_time_s", 0) or 0.0,
            samples_per_s=c.number("samples_per_s", 0) or 0.0,
            wall_time_s=c.number("wall_time_s", 0, optional=False),
            peak_memory_mb=c.number("peak_memory_mb", 0) or 0.0,
            processes=c.number("processes", 1, integer=True) or 1,
            best_val_acc=c.number("best_val_acc", 0, 1),
            stopped_early=c.flag("stopped_early"),
            final_train_loss=c.number("final_train_loss"),
            final_eval_loss=c.number("final_eval_loss"),
            breakdown=dict(breakdown),
            truncation=dict(c.mapping("truncation")),
            val=splits["val"],
            test=splits["test"],
            compile=None if raw_compile is None else CompileRecord.from_dict(raw_compile, where),
            schema_version=version,
        )


@dataclass(frozen=True)
class PrunedRecord:
    """pruned.json: a sweep's pruner stopped the run at `step` (resumable to full length)."""

    step: int
    reason: str
    val_acc: float
    trial: Optional[int] = None  # the Optuna trial that pruned it (asynchronous pruning)
    leader: Optional[str] = None  # the rung's leader it was compared with (synchronous rungs)
    p_value: Optional[float] = None
    trainable_params: Optional[int] = None

    @classmethod
    def from_json(cls, data: Any, where: str) -> "PrunedRecord":
        c = _Checker(data, where)
        return cls(
            c.number("step", 0, optional=False, integer=True),
            c.text("reason") or "",
            c.number("val_acc", 0, 1) or 0.0,
            c.number("trial", 0, integer=True),
            c.text("leader"),
            c.number("p_value", 0, 1),
            c.number("trainable_params", 0, integer=True),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
