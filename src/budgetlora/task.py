"""What a problem type means, as types: the label space a model's outputs live in (`LabelSpace`:
the task, the output names, the regression targets' scaling) and the decisions that turn outputs
into answers (`Decisions`: a softmax temperature, per-label thresholds, the regression scale),
tuned on the validation split after training. A run stores both (labels.json, decisions.json); an
export bakes the decisions into its last layer, so plain Transformers and ONNX Runtime give the
same answers. No torch: runs, tables and exports read these on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from budgetlora.artifacts.summary import OBJECTIVE_OF
from budgetlora.config.schema import MAX_TARGETS, MIN_CLASSES, TASKS
from budgetlora.errors import BudgetLoraError

SINGLE, MULTI, REGRESSION = TASKS
# Transformers' config.problem_type for each task (what its own heads and pipelines read)
PROBLEM_TYPES = {SINGLE: "single_label_classification", MULTI: "multi_label_classification", REGRESSION: "regression"}
POSITIVE = 0.5  # a multi-label target above this is a positive (targets are 0/1)
PAIR = 2  # the sides of a text pair
THRESHOLD_RANGE = (0.01, 0.99)  # tuned thresholds stay inside: their logit is finite and baked into a bias


def _damaged(where: str, what: str) -> BudgetLoraError:
    return BudgetLoraError(f"{where}: {what}; the file is damaged (train the run again, or restore the file)")


def _numbers(value: Any, n: int, where: str, key: str, positive: bool = False) -> tuple[float, ...]:
    ok = (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and (not positive or all(v > 0 for v in value))
    )
    if not ok:
        raise _damaged(where, f"{key} is not a list of {n} finite{' positive' if positive else ''} numbers")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class LabelSpace:
    """The model's outputs: one per class (single- and multi-label) or per regression target, with
    the targets' training mean and standard deviation when the model learned standardised values."""

    task: str
    names: tuple[str, ...]
    target_mean: tuple[float, ...] = ()
    target_std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BudgetLoraError(f"unknown task {self.task!r}; one of {', '.join(TASKS)}")
        least = 1 if self.task == REGRESSION else MIN_CLASSES
        if len(self.names) < least or len(set(self.names)) != len(self.names) or not all(self.names):
            raise BudgetLoraError(f"{self.task}: needs {least} or more distinct non-empty output names")
        if len(self.names) > MAX_TARGETS and self.task == REGRESSION:
            raise BudgetLoraError(f"regression: {len(self.names):,} targets; at most {MAX_TARGETS:,}")
        if (self.target_mean or self.target_std) and (
            self.task != REGRESSION or len(self.target_mean) != self.width or len(self.target_std) != self.width
        ):
            raise BudgetLoraError("target_mean/target_std: one value per regression target")
        if any(not math.isfinite(v) for v in self.target_mean) or any(
            not (math.isfinite(v) and v > 0) for v in self.target_std
        ):
            raise BudgetLoraError("target_mean/target_std: finite numbers (std > 0)")

    @property
    def width(self) -> int:
        return len(self.names)

    @property
    def objective(self) -> str:
        return OBJECTIVE_OF[self.task]

    @property
    def is_classification(self) -> bool:
        return self.task != REGRESSION

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"task": self.task, "names": list(self.names)}
        if self.target_mean:
            data.update(target_mean=list(self.target_mean), target_std=list(self.target_std))
        return data

    @classmethod
    def from_json(cls, data: Any, where: str) -> "LabelSpace":
        """labels.json (runs written before tasks existed hold only `names`: single-label)."""
        if not isinstance(data, dict):
            raise _damaged(where, "not a JSON object")
        task, names = data.get("task", SINGLE), data.get("names")
        if task not in TASKS:
            raise _damaged(where, f"task is not one of {', '.join(TASKS)}")
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise _damaged(where, "names is not a list of output names")
        width = len(names)
        mean = _numbers(data["target_mean"], width, where, "target_mean") if "target_mean" in data else ()
        std = _numbers(data["target_std"], width, where, "target_std", positive=True) if "target_std" in data else ()
        try:
            return cls(task, tuple(names), mean, std)
        except BudgetLoraError as exc:
            raise _damaged(where, str(exc)) from None

    def original_units(self, outputs: np.ndarray) -> np.ndarray:
        """Regression outputs in the targets' own units (identity without standardisation)."""
        if not self.target_mean:
            return outputs
        return outputs * np.asarray(self.target_std, dtype=outputs.dtype) + np.asarray(
            self.target_mean, dtype=outputs.dtype
        )


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Decisions:
    """How outputs become answers, tuned on validation after training.

    single-label: the class is the argmax; probabilities are softmax(logits / temperature).
    multi-label: label c is on when its logit > logit(thresholds[c]) (probability > threshold).
    regression: the answer is outputs x scale + shift (the training targets' std and mean).
    `baked`: the model's last layer already applies these (an export): its outputs are used as
    they come, and the values here only describe what was applied."""

    task: str
    width: int
    temperature: float = 1.0
    thresholds: tuple[float, ...] = ()
    tuned: tuple[bool, ...] = ()  # per label: tuned on validation, else the shared fallback threshold
    scale: tuple[float, ...] = ()
    shift: tuple[float, ...] = ()
    baked: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.task not in TASKS or self.width < 1:
            raise BudgetLoraError(f"decisions: unknown task {self.task!r} or no outputs")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise BudgetLoraError("decisions: the temperature must be a finite positive number")
        if self.thresholds and (
            self.task != MULTI
            or len(self.thresholds) != self.width
            or not all(THRESHOLD_RANGE[0] <= t <= THRESHOLD_RANGE[1] for t in self.thresholds)
        ):
            raise BudgetLoraError(
                f"decisions: thresholds need one value per label in [{THRESHOLD_RANGE[0]}, {THRESHOLD_RANGE[1]}]"
            )
        if self.tuned and len(self.tuned) != len(self.thresholds):
            raise BudgetLoraError("decisions: `tuned` needs one flag per threshold")
        if (self.scale or self.shift) and (len(self.scale) != self.width or len(self.shift) != self.width):
            raise BudgetLoraError("decisions: scale/shift need one value per regression target")

    @classmethod
    def default(cls, space: LabelSpace) -> "Decisions":
        """Before tuning: temperature 1, threshold 0.5 for every label, the space's own scaling."""
        return cls(
            space.task,
            space.width,
            thresholds=(0.5,) * space.width if space.task == MULTI else (),
            tuned=(False,) * space.width if space.task == MULTI else (),
            scale=space.target_std,
            shift=space.target_mean,
        )

    @property
    def label_thresholds(self) -> np.ndarray:
        return np.asarray(self.thresholds or (0.5,) * self.width, dtype=np.float64)

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """Probabilities (classification) or values in the targets' units (regression)."""
        outputs = np.asarray(outputs, dtype=np.float64)
        if self.task == SINGLE:
            return softmax(outputs if self.baked else outputs / self.temperature)
        if self.task == MULTI:
            # an export's outputs are logit - logit(threshold): the model's own probability is
            # the run's, whatever threshold was folded in
            return sigmoid(outputs + logit(self.label_thresholds) if self.baked else outputs)
        if self.baked or not self.scale:
            return outputs
        return outputs * np.asarray(self.scale) + np.asarray(self.shift)

    def decide(self, outputs: np.ndarray) -> np.ndarray:
        """Class indices (single-label), a rows x labels boolean matrix (multi-label) or values."""
        outputs = np.asarray(outputs, dtype=np.float64)
        if self.task == SINGLE:
            return outputs.argmax(1)
        if self.task == MULTI:
            cut = 0.0 if self.baked else logit(self.label_thresholds)
            return outputs > cut
        return self.scores(outputs)

    def baked_outputs(self, outputs: np.ndarray) -> np.ndarray:
        """What a model whose last layer has these decisions baked in outputs for `outputs`:
        logits / temperature, logits - logit(threshold), or values in the targets' units."""
        outputs = np.asarray(outputs, dtype=np.float64)
        if self.baked:
            return outputs
        if self.task == SINGLE:
            return outputs / self.temperature
        if self.task == MULTI:
            return outputs - logit(self.label_thresholds)
        return self.scores(outputs)

    def as_baked(self) -> "Decisions":
        return Decisions(
            self.task,
            self.width,
            self.temperature,
            self.thresholds,
            self.tuned,
            self.scale,
            self.shift,
            baked=True,
            notes=self.notes,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "width": self.width,
            "temperature": self.temperature,
            "thresholds": list(self.thresholds),
            "tuned": list(self.tuned),
            "scale": list(self.scale),
            "shift": list(self.shift),
            "baked": self.baked,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Decisions":
        if not isinstance(data, dict):
            raise _damaged(where, "not a JSON object")
        width = data.get("width")
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 10**6:
            raise _damaged(where, "width is not a positive integer")
        temperature = data.get("temperature", 1.0)
        lists = {}
        for key in ("thresholds", "scale", "shift"):
            value = data.get(key) or []
            lists[key] = _numbers(value, len(value) if isinstance(value, list) else -1, where, key)
        tuned = data.get("tuned") or []
        notes = data.get("notes") or []
        if not isinstance(tuned, list) or not all(isinstance(t, bool) for t in tuned):
            raise _damaged(where, "tuned is not a list of true/false")
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise _damaged(where, "notes is not a list of strings")
        if not isinstance(data.get("baked", False), bool) or isinstance(temperature, bool):
            raise _damaged(where, "baked/temperature have the wrong type")
        try:
            return cls(
                data.get("task"),
                width,
                float(temperature) if isinstance(temperature, (int, float)) else math.nan,
                lists["thresholds"],
                tuple(tuned),
                lists["scale"],
                lists["shift"],
                data.get("baked", False),
                tuple(notes),
            )
        except BudgetLoraError as exc:
            raise _damaged(where, str(exc)) from None


def global_threshold(decisions: Decisions, threshold: Any) -> Decisions:
    """The same decisions with one threshold for every label (a multi-label run only), e.g. to
    compare with a paper's single global 0.3."""
    if decisions.task != MULTI:
        raise BudgetLoraError(f"a threshold applies to multi-label models; this one is {decisions.task}")
    if decisions.baked:
        raise BudgetLoraError("an export has its thresholds in its weights; give the run directory for --threshold")
    low, high = THRESHOLD_RANGE
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not low <= threshold <= high:
        raise BudgetLoraError(f"threshold must be a number in [{low}, {high}], not {threshold!r}")
    return Decisions(
        MULTI,
        decisions.width,
        thresholds=(float(threshold),) * decisions.width,
        tuned=(False,) * decisions.width,
        notes=(f"one global threshold {threshold:g}",),
    )


def check_decisions_fit(decisions: Decisions, space: LabelSpace, where: str) -> None:
    """A run's decisions must be for its own outputs (an edited or copied file would misread them)."""
    if decisions.task != space.task or decisions.width != space.width:
        raise BudgetLoraError(
            f"{where}: decisions for a {decisions.task} model with {decisions.width} outputs, but the run is "
            f"{space.task} with {space.width}; restore the file"
        )


def join_labels(indices: Sequence[int], names: Sequence[str], separator: str) -> str:
    return separator.join(names[i] for i in indices)


def describe_thresholds(decisions: Decisions, names: Sequence[str], shown: int = 6) -> Optional[str]:
    if decisions.task != MULTI:
        return None
    pairs = [
        f"{n} {t:.2f}{'' if ok else '*'}" for n, t, ok in zip(names, decisions.thresholds, decisions.tuned, strict=True)
    ]
    more = f", ... ({len(pairs)} labels)" if len(pairs) > shown else ""
    return "thresholds " + ", ".join(pairs[:shown]) + more + " (* not tuned: too few positives)"
