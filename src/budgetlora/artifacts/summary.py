"""A finished run's summary (summary.json) as types: `RunSummary` with a `SplitMetrics` per
evaluated split, validated once when built (from the recipe or from disk), immutable after, with a
JSON round trip and a schema version. Every reader and writer of summary.json goes through here
(artifacts.run_dir.read_summary / write_summary); nothing else reads the file's keys. No torch.

summary.json (schema 3; schemas 1 and 2, written before tasks existed, are single-label runs
without `task` and are read as well; schema 1 also lacks `compile` and `schema_version`):

    name, task, mode, model, budget, trainable_params, total_params, breakdown {module kind: count},
    steps, total_steps, best_step, best_val_acc (the best evaluation's validation objective:
    accuracy, macro-F1 or Spearman), stopped_early, final_train_loss, final_eval_loss,
    train_time_s, samples_per_s, wall_time_s, peak_memory_mb, device, precision, processes,
    label_names (classes, or regression targets), truncation {split: {rows, truncated, ...}},
    compile {widths, graphs, seconds, recompiles, failure} or null, val / test: {task, n,
    accuracy, correct, ci_low, ci_high, macro_f1, loss, per_class {class: {precision, recall, f1,
    support}}, confusion_matrix, scores {name: {value, low, high}}, calibration {temperature,
    ece_before, ece_after, bins_before / bins_after {count, confidence, accuracy} per confidence
    bin}, per_target {target: {pearson, spearman, mae, rmse}}} or absent
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from budgetlora.artifacts.json_checks import Checker

SCHEMA_VERSION = 3
ACCURACY_SLACK = 1e-9  # float round-off between stored figures that must agree


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class Interval:
    """A figure with its 95% interval."""

    value: float
    low: float
    high: float

    @classmethod
    def from_dict(cls, data: Any, where: str, prefix: str) -> "Interval":
        c = Checker(data, where, prefix)
        value = c.number("value", optional=False)
        low, high = c.number("low", optional=False), c.number("high", optional=False)
        if not low - ACCURACY_SLACK <= value <= high + ACCURACY_SLACK:
            raise c.fail("value", "inside its own interval (low..high)")
        return cls(value, low, high)


MAX_BINS = 100


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram's points: per confidence bin, its rows, mean confidence, accuracy."""

    count: tuple[int, ...]
    confidence: tuple[float, ...]
    accuracy: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: Any, where: str, prefix: str) -> Optional["Reliability"]:
        if data is None:
            return None
        c = Checker(data, where, prefix)
        lists = {key: data.get(key) if isinstance(data, dict) else None for key in ("count", "confidence", "accuracy")}
        sizes = {len(v) if isinstance(v, list) else -1 for v in lists.values()}
        if len(sizes) != 1 or not 1 <= next(iter(sizes)) <= MAX_BINS:
            raise c.fail("count", f"one of three lists (count, confidence, accuracy) of equal length 1-{MAX_BINS}")
        for key, values in lists.items():
            integer = key == "count"
            for i, value in enumerate(values):
                item = f"{key}[{i}]"
                Checker({item: value}, where, prefix).number(item, 0, math.inf if integer else 1, False, integer)
        return cls(
            tuple(int(v) for v in lists["count"]),
            tuple(float(v) for v in lists["confidence"]),
            tuple(float(v) for v in lists["accuracy"]),
        )


@dataclass(frozen=True)
class Calibration:
    """The softmax temperature fitted on validation and the expected calibration error (15 bins)
    of this split's probabilities before and after it, with the reliability diagrams' points."""

    temperature: float
    ece_before: float
    ece_after: float
    bins_before: Optional[Reliability] = None
    bins_after: Optional[Reliability] = None


# the figure a task is judged by (what validation chooses on and results rank by), and its name in prose
OBJECTIVE_OF = {"single_label": "accuracy", "multi_label": "macro_f1", "regression": "spearman"}
OBJECTIVE_WORDS = {"single_label": "accuracy", "multi_label": "macro-F1", "regression": "Spearman"}
SCORE_NAMES = {
    "single_label": (),
    "multi_label": ("macro_f1", "micro_f1", "subset_accuracy", "jaccard"),
    "regression": ("pearson", "spearman", "mae", "rmse"),
}


@dataclass(frozen=True)
class SplitMetrics:
    """Metrics of one labeled split.

    single-label: accuracy with n and its 95% Wilson interval, macro-F1, the mean cross-entropy,
    per-class precision / recall / F1, the confusion matrix, and the calibration of its
    probabilities. multi-label: `accuracy` is subset accuracy (exact label sets, Wilson interval),
    `macro_f1` the macro-F1 at the run's thresholds, `scores` each headline with a bootstrap 95%
    interval, `per_class` per label. regression: `scores` only (accuracy and macro_f1 absent).
    `objective` is the task's figure with its interval: what runs are chosen and ranked by."""

    n: int
    accuracy: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    macro_f1: Optional[float] = None
    correct: Optional[int] = None
    loss: Optional[float] = None
    per_class: dict[str, ClassMetrics] = field(default_factory=dict)
    confusion_matrix: Optional[list[list[int]]] = None
    task: str = "single_label"
    scores: dict[str, Interval] = field(default_factory=dict)
    calibration: Optional[Calibration] = None
    per_target: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def objective_name(self) -> str:
        return OBJECTIVE_OF[self.task]

    @property
    def objective(self) -> Interval:
        if self.task == "single_label":
            assert self.accuracy is not None and self.ci_low is not None and self.ci_high is not None
            return Interval(self.accuracy, self.ci_low, self.ci_high)
        return self.scores[self.objective_name]

    def headline(self) -> str:
        """One line: the task's figures with their 95% intervals and n."""
        if self.task == "single_label":
            assert self.accuracy is not None and self.ci_low is not None and self.macro_f1 is not None
            return (
                f"accuracy {100 * self.accuracy:.2f}% (95% CI {100 * self.ci_low:.2f}-{100 * self.ci_high:.2f}, "
                f"n={self.n:,}); macro-F1 {100 * self.macro_f1:.2f}"
            )

        def figure(name: str, percent: bool) -> str:
            score = self.scores[name]
            k = 100 if percent else 1
            digits = 2 if percent else 4
            return (
                f"{name.replace('_', '-')} {k * score.value:.{digits}f} "
                f"(95% CI {k * score.low:.{digits}f}-{k * score.high:.{digits}f})"
            )

        names = SCORE_NAMES[self.task]
        return ", ".join(figure(name, self.task == "multi_label") for name in names) + f"; n={self.n:,}"

    @classmethod
    def from_dict(cls, data: Any, where: str, prefix: str = "") -> "SplitMetrics":
        c = Checker(data, where, prefix)
        task = data.get("task", "single_label")
        if task not in OBJECTIVE_OF:
            raise c.fail("task", f"one of {', '.join(OBJECTIVE_OF)}")
        n = c.number("n", 0, optional=False, integer=True)
        correct = c.number("correct", 0, n, integer=True)
        classification = task != "regression"
        per_class = {}
        for name, row in c.mapping("per_class").items():
            r = Checker(row, where, f"{prefix}per_class.{name}.")
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
        raw_scores = c.mapping("scores")
        missing = [k for k in SCORE_NAMES[task] if k not in raw_scores]
        if missing:
            raise c.fail("scores", f"a mapping with {', '.join(SCORE_NAMES[task])}")
        scores = {str(k): Interval.from_dict(v, where, f"{prefix}scores.{k}.") for k, v in raw_scores.items()}
        raw_calibration = data.get("calibration")
        calibration = None
        if raw_calibration is not None:
            k = Checker(raw_calibration, where, f"{prefix}calibration.")
            calibration = Calibration(
                k.number("temperature", 0, optional=False),
                k.number("ece_before", 0, 1, optional=False),
                k.number("ece_after", 0, 1, optional=False),
                Reliability.from_dict(k.data.get("bins_before"), where, f"{prefix}calibration.bins_before."),
                Reliability.from_dict(k.data.get("bins_after"), where, f"{prefix}calibration.bins_after."),
            )
        per_target = {}
        for name, row in c.mapping("per_target").items():
            r = Checker(row, where, f"{prefix}per_target.{name}.")
            per_target[str(name)] = {key: r.number(key, optional=False) for key in SCORE_NAMES["regression"]}
        split = cls(
            n=n,
            accuracy=c.number("accuracy", 0, 1, optional=not classification),
            ci_low=c.number("ci_low", 0, 1, optional=not classification),
            ci_high=c.number("ci_high", 0, 1, optional=not classification),
            macro_f1=c.number("macro_f1", 0, 1, optional=not classification),
            correct=correct,
            loss=c.number("loss", 0),
            per_class=per_class,
            confusion_matrix=matrix,
            task=task,
            scores=scores,
            calibration=calibration,
            per_target=per_target,
        )
        if classification:
            assert split.accuracy is not None and split.ci_low is not None and split.ci_high is not None
            if correct is not None and n and abs(split.accuracy - correct / n) > ACCURACY_SLACK:
                raise c.fail("accuracy", f"correct / n ({correct}/{n}), as it must be")
            if not split.ci_low - ACCURACY_SLACK <= split.accuracy <= split.ci_high + ACCURACY_SLACK:
                raise c.fail("accuracy", "inside its own confidence interval (ci_low..ci_high)")
        if matrix is not None and n and sum(map(sum, matrix)) != n:
            raise c.fail("confusion_matrix", f"a matrix of n = {n} counts")
        return split

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("accuracy", "ci_low", "ci_high", "macro_f1", "calibration", "confusion_matrix", "correct"):
            if data[key] is None:
                del data[key]
        for key in ("scores", "per_target"):
            if not data[key]:
                del data[key]
        return data


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
        c = Checker(data, where, "compile.")
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
    task: str = "single_label"
    schema_version: int = SCHEMA_VERSION

    @property
    def objective_name(self) -> str:
        return OBJECTIVE_OF[self.task]

    @property
    def val_acc(self) -> Optional[float]:
        """The validation objective a sweep optimises (accuracy for single-label runs): the best
        evaluation's, else the final model's."""
        if self.best_val_acc is not None:
            return self.best_val_acc
        return self.val.objective.value if self.val is not None else None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("val", "test"):
            split = getattr(self, key)
            if split is None:
                del data[key]
            else:
                data[key] = split.to_dict()
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> "RunSummary":
        """Validate a summary read from disk (any schema up to SCHEMA_VERSION)."""
        c = Checker(data, where)
        version = c.number("schema_version", 1, SCHEMA_VERSION, integer=True) or 1
        names = data.get("label_names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise c.fail("label_names", "a list of class names")
        breakdown = c.mapping("breakdown")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in breakdown.values()):
            raise c.fail("breakdown", "a mapping of module kinds to counts")
        task = data.get("task", "single_label")
        if task not in OBJECTIVE_OF:
            raise c.fail("task", f"one of {', '.join(OBJECTIVE_OF)}")
        splits = {}
        for split in ("val", "test"):
            part = data.get(split)
            splits[split] = None if part is None else SplitMetrics.from_dict(part, where, f"{split}.")
            if splits[split] is not None and splits[split].task != task:
                raise c.fail(f"{split}.task", f"the run's task ({task})")
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
            best_val_acc=c.number("best_val_acc", -1, 1),
            stopped_early=c.flag("stopped_early"),
            final_train_loss=c.number("final_train_loss"),
            final_eval_loss=c.number("final_eval_loss"),
            breakdown=dict(breakdown),
            truncation=dict(c.mapping("truncation")),
            val=splits["val"],
            test=splits["test"],
            compile=None if raw_compile is None else CompileRecord.from_dict(raw_compile, where),
            task=task,
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
        c = Checker(data, where)
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
