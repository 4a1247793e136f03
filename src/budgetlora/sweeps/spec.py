"""The study file: which configurations a sweep trains (docs/sweeps.md).

    base: ../configs/agnews-minilm-offline.yaml   # relative to the study file
    set: {train.max_steps: 200}                    # overrides for every trial
    grid: {lora.r: [1, 2], lora.targets: [[q, v], [q, k, v]]}   # cartesian product
    zip: {train.optimizer: [adamw, sgd], train.lr: [5.0e-4, 1.0e-2]}  # zipped lists
    seeds: [1, 2, 3]

or a search (`optuna:` = TPE, `random:`) over ranges with `n_trials:`; `prune:` and `confirm:`
sections configure pruning and confirmation (sweeps/prune.py, sweeps/halving.py, sweeps/run.py).
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from budgetlora.config import build_section, flatten, parse_override, read_yaml, resolve_paths, set_dotted
from budgetlora.config.schema import Range, opt
from budgetlora.errors import BudgetLoraError

# Keys a study file may hold; anything else is a typo worth refusing.
STUDY_KEYS = (
    "name",
    "base",
    "set",
    "grid",
    "zip",
    "seeds",
    "optuna",
    "random",
    "n_trials",
    "objectives",
    "sampler_seed",
    "description",
    "prune",
    "confirm",
)


OBJECTIVES = {"val_acc": "maximize", "trainable_params": "minimize"}


ALPHA_OVER_R = "lora.alpha_over_r"  # pseudo-key: lora.alpha = value * the trial's (resolved) rank


MAX_RANK = "max"  # `lora.r: max`: the largest rank under the budget for the trial's targets


# Short names for run directories: r2-alpha4-targets_q_v-seed1 rather than lora.r=2,...
_ALIASES = {
    "lora.r": "r",
    "lora.alpha": "alpha",
    "lora.dropout": "drop",
    "lora.targets": "targets",
    "lora.bias": "bias",
    "train.lr": "lr",
    "train.optimizer": "opt",
    "train.scheduler": "sched",
    "train.lora_plus_ratio": "loraplus",
    "train.seed": "seed",
    "train.weight_decay": "wd",
    "train.batch_size": "bs",
    "train.max_steps": "steps",
    "lora.use_rslora": "rslora",
    "lora.use_dora": "dora",
}


@dataclass
class Point:
    """One configuration to train: dotted overrides (before `max`/alpha_over_r are resolved)."""

    name: str
    overrides: dict[str, Any]
    axes: dict[str, Any] = field(default_factory=dict)  # axis label -> value, for display


@dataclass
class Param:
    """One dimension of a random/TPE search."""

    key: str
    kind: str  # "categorical", "int" or "float"
    choices: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class StudySpec:
    path: Path
    name: str
    base_raw: dict[str, Any]
    fixed: dict[str, Any]  # study `set` plus --set, dotted keys
    points: list[Point]  # grid mode; empty in search mode
    search: list[Param]
    sampler: str | None  # None (grid), "tpe" or "random"
    seeds: list[int] | None
    n_trials: int | None
    objectives: list[str]
    sampler_seed: int | None = None
    prune: Any = None  # sweeps.prune.PruneSpec (complete: rungs and comparisons), or None: no pruning
    confirm: Any = None  # sweeps.prune.ConfirmSpec, or None: no confirmation phase

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]


def _study_error(path: Path, what: str) -> BudgetLoraError:
    return BudgetLoraError(f"{path}: {what}")


def _dotted(raw: Any, path: Path, where: str, base_dir: Path) -> dict[str, Any]:
    """A mapping of (possibly nested) config keys -> flat dotted keys, paths made absolute."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _study_error(path, f"'{where}' must be a mapping of config keys")
    nested: dict[str, Any] = {}
    for key, value in raw.items():
        set_dotted(nested, str(key), value)
    resolve_paths(nested, base_dir)
    return flatten(nested)


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(_fmt_value(v) for v in value)
    if isinstance(value, str) and ("/" in value or os.sep in value):
        return Path(value).stem
    return str(value)


def name_part(key: str, value: Any) -> str:
    """`lora.r`, 2 -> "r2"; `lora.targets`, [q, v] -> "targets_q_v"; alpha_over_r 2 -> "alpha2r"."""
    if key == ALPHA_OVER_R:
        return _safe(f"alpha{_fmt_value(value)}r")
    alias = _ALIASES.get(key, key.rsplit(".", 1)[-1])
    text = _fmt_value(value)
    # A word value reads better apart from a long alias (bias_none); numbers and r stay joined (r2, rmax).
    sep = "_" if len(alias) > 1 and text[:1].isalpha() else ""
    return _safe(f"{alias}{sep}{text}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+]", "_", text)


def _axis_values(path: Path, key: str, values: Any, study_dir: Path) -> list[tuple[str, dict[str, Any], Any]]:
    """(name part, dotted overrides, display value) per value of one axis.

    A list is the values of config key `key`; a mapping is a bundle axis: each entry is a
    label -> overrides (e.g. `method: {lora: {mode: lora}, full: {mode: full, train.lr: 2e-5}}`)."""
    if isinstance(values, dict):
        if not values:
            raise _study_error(path, f"axis '{key}' has no values")
        return [
            (_safe(str(label)), _dotted(over, path, f"{key}.{label}", study_dir), str(label))
            for label, over in values.items()
        ]
    if not isinstance(values, list) or not values:
        raise _study_error(path, f"axis '{key}' must be a non-empty list of values (or a mapping label -> overrides)")
    out = []
    for value in values:
        over = _dotted({key: value}, path, key, study_dir) if key != ALPHA_OVER_R else {key: value}
        if key == "lora.r" and value != MAX_RANK and not (isinstance(value, int) and not isinstance(value, bool)):
            raise _study_error(path, f"lora.r values must be integers or '{MAX_RANK}', got {value!r}")
        out.append((name_part(key, value), over, value))
    return out


Axis = list[tuple[str, dict[str, Any], dict[str, Any]]]  # (name part, overrides, display) per value


def _grid_axes(path: Path, raw: Any, study_dir: Path) -> list[Axis]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise _study_error(path, "'grid' must be a mapping: config key -> list of values")
    axes = []
    for key, values in raw.items():
        axes.append(
            [(part, over, {str(key): shown}) for part, over, shown in _axis_values(path, str(key), values, study_dir)]
        )
    return axes


def _zip_axes(path: Path, raw: Any, study_dir: Path) -> list[Axis]:
    """`zip:` is one mapping of equal-length lists, or a list of such mappings (each zipped on its own)."""
    if raw is None:
        return []
    groups = raw if isinstance(raw, list) else [raw]
    axes = []
    for group in groups:
        if not isinstance(group, dict) or not group:
            raise _study_error(path, "'zip' must be a mapping of config key -> list (or a list of such mappings)")
        columns = {str(k): _axis_values(path, str(k), v, study_dir) for k, v in group.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise _study_error(
                path, "zipped lists must have the same length: " + ", ".join(f"{k} has {n}" for k, n in lengths.items())
            )
        axis: Axis = []
        for row in zip(*columns.values(), strict=False):
            over: dict[str, Any] = {}
            for _, o, _ in row:
                over.update(o)
            axis.append(
                (
                    "-".join(part for part, _, _ in row),
                    over,
                    {k: shown for k, (_, _, shown) in zip(columns, row, strict=False)},
                )
            )
        axes.append(axis)
    return axes


def _search_space(path: Path, raw: Any) -> list[Param]:
    if not isinstance(raw, dict) or not raw:
        raise _study_error(path, "a search ('optuna:' or 'random:') must map config keys to value lists or ranges")
    space = []
    for key, spec in raw.items():
        key = str(key)
        if isinstance(spec, list):
            if not spec:
                raise _study_error(path, f"search key '{key}' has no choices")
            space.append(Param(key, "categorical", choices=list(spec)))
        elif isinstance(spec, dict) and "low" in spec and "high" in spec:
            unknown = set(spec) - {"low", "high", "log", "step", "type"}
            if unknown:
                raise _study_error(
                    path,
                    f"search key '{key}': unknown range option(s) {sorted(unknown)}; valid: low, high, log, step, type",
                )
            low, high = spec["low"], spec["high"]
            if (
                not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)
                )
                or low > high
            ):
                raise _study_error(path, f"search key '{key}': low/high must be finite numbers with low <= high")
            if spec.get("log") and low <= 0:
                raise _study_error(path, f"search key '{key}': a log range needs low > 0 (got {low!r})")
            step = spec.get("step")
            if step is not None and (
                isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0
            ):
                raise _study_error(path, f"search key '{key}': step must be a positive number (got {step!r})")
            kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) else "float")
            if kind not in ("int", "float"):
                raise _study_error(path, f"search key '{key}': type must be int or float")
            space.append(Param(key, kind, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step")))
        else:
            raise _study_error(path, f"search key '{key}': give a list of choices or {{low: .., high: .., log: true}}")
    return space


MAX_POINTS = 10_000  # a grid beyond this is a typo (or an attack), and would take years on any machine
MAX_TRIALS = 100_000


def _expand(axes: list[Axis], seeds: list[int] | None, path: Path) -> list[Point]:
    count = math.prod(len(axis) for axis in axes) * len(seeds or [None])
    if count > MAX_POINTS:
        raise _study_error(
            path,
            f"the grid has {count:,} points (axes of {' x '.join(str(len(a)) for a in axes)}"
            f"{f' x {len(seeds)} seeds' if seeds else ''}); at most {MAX_POINTS:,} are allowed",
        )
    points = []
    for combo in itertools.product(*axes):
        parts, overrides, shown = [], {}, {}
        for part, over, display in combo:
            parts.append(part)
            overrides.update(over)
            shown.update(display)
        for seed in [*seeds] if seeds else [None]:
            over = dict(overrides)
            name_parts = list(parts)
            if seed is not None:
                over["train.seed"] = seed
                name_parts.append(f"seed{seed}")
            points.append(Point("-".join(name_parts) or "base", over, dict(shown)))
    counts = collections.Counter(p.name for p in points)
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise BudgetLoraError(
            f"the study gives several points the same run name: {', '.join(dupes)} (a value listed twice?)"
        )
    return points


STUDY_NAME_PATTERN = r"[A-Za-z0-9._+-]{1,100}"
Objective = Literal["val_acc", "trainable_params"]


@dataclass(frozen=True)
class StudyOptions:
    """The study file's scalar keys, validated by the config's typed field machinery."""

    name: Optional[str] = opt(None, "the sweep's name (its folder, the Optuna study)")
    description: Optional[str] = opt(None, "free text")
    seeds: Optional[list[int]] = opt(None, "every point once per seed", range=Range(0, 2**32 - 1))
    n_trials: Optional[int] = opt(None, "trials of a search", range=Range(1, MAX_TRIALS))
    objectives: Union[Objective, list[Objective]] = opt(help="what the sweep optimises", factory=lambda: ["val_acc"])
    sampler_seed: Optional[int] = opt(None, "seed of the search's sampler", range=Range(0, 2**32 - 1))

    def __post_init__(self) -> None:
        objectives = [self.objectives] if isinstance(self.objectives, str) else list(self.objectives)
        if not objectives or len(set(objectives)) != len(objectives):
            raise BudgetLoraError("study key 'objectives': must list distinct objectives (val_acc, trainable_params)")
        object.__setattr__(self, "objectives", objectives)
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise BudgetLoraError("study key 'seeds': must list at least one seed, each once")
        if self.name is not None and (not re.fullmatch(STUDY_NAME_PATTERN, self.name) or not self.name.strip(".")):
            raise BudgetLoraError(
                "study key 'name': must be a plain word (letters, digits, . _ + -, not only dots; "
                "it names the sweep folder)"
            )


def _options(path: Path, raw: dict[str, Any], seeds: list[int] | None) -> StudyOptions:
    picked = {k: raw[k] for k in ("name", "description", "seeds", "n_trials", "objectives", "sampler_seed") if k in raw}
    if seeds is not None:
        picked["seeds"] = list(seeds)
    try:
        return build_section(StudyOptions, picked, "", "study key")
    except BudgetLoraError as exc:
        raise _study_error(path, str(exc)) from None


def _cli_overrides(overrides: Sequence[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items as dotted keys, data paths relative to the working directory."""
    cli_raw: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(cli_raw, key, value)
    resolve_paths(cli_raw, Path.cwd())
    return flatten(cli_raw)


def _grid_points(path: Path, raw: dict[str, Any], study_dir: Path, seeds: list[int] | None) -> list[Point]:
    axes: list[Axis] = []
    for key in raw:  # file order decides the name order, so `zip:` written first names first
        if key == "grid":
            axes += _grid_axes(path, raw["grid"], study_dir)
        elif key == "zip":
            axes += _zip_axes(path, raw["zip"], study_dir)
    return _expand(axes, seeds, path)


def load_study(path: str | Path, overrides: Sequence[str] | None = None, seeds: list[int] | None = None) -> StudySpec:
    """Read and validate a study file; `overrides` are `--set KEY=VALUE` items (paths relative to
    CWD); `seeds` replaces the file's seeds (e.g. one seed for a quick check)."""
    path = Path(path)
    raw = read_yaml(path)
    study_dir = path.resolve().parent
    unknown = [k for k in raw if k not in STUDY_KEYS]
    if unknown:
        raise _study_error(path, f"unknown study key(s) {unknown}; valid: {', '.join(STUDY_KEYS)}")
    if not isinstance(raw.get("base"), str):
        raise _study_error(path, "'base' must name the base config file (relative to the study file)")
    base_path = (study_dir / raw["base"]).resolve()
    base_raw = read_yaml(base_path)
    resolve_paths(base_raw, base_path.parent)
    options = _options(path, raw, seeds)
    seeds, n_trials = options.seeds, options.n_trials
    searches = [k for k in ("optuna", "random") if k in raw]
    if len(searches) > 1 or (searches and ("grid" in raw or "zip" in raw)):
        raise _study_error(path, "use either grid/zip or one search ('optuna:' or 'random:'), not both")
    if searches and n_trials is None:
        raise _study_error(path, f"a '{searches[0]}:' search needs n_trials: N (1 <= N <= {MAX_TRIALS:,})")
    search = _search_space(path, raw[searches[0]]) if searches else []
    points = [] if searches else _grid_points(path, raw, study_dir, seeds)
    axis_keys = [p.key for p in search] if searches else sorted({k for p in points for k in p.overrides})
    cli = _cli_overrides(overrides)
    clash = sorted(set(cli) & (set(axis_keys) | ({"train.seed"} if seeds else set())))
    if clash:
        raise BudgetLoraError(f"--set {', '.join(clash)}: the study varies these keys; edit the study file instead")
    name = options.name or path.stem
    if not re.fullmatch(STUDY_NAME_PATTERN, name) or not name.strip("."):
        raise _study_error(
            path,
            f"study key 'name': the file name {path.name!r} is not a plain word; give "
            "'name: ...' (letters, digits, . _ + -; it names the sweep folder)",
        )
    from budgetlora.sweeps.prune import STATISTICAL, parse_confirm, parse_prune

    prune = parse_prune(path, raw.get("prune"))
    fixed = {**_dotted(raw.get("set"), path, "set", study_dir), **cli}
    task = fixed.get("task", base_raw.get("task", "single_label"))
    if prune is not None and prune.test in STATISTICAL and task != "single_label":
        raise _study_error(
            path,
            f"study key 'prune.test': {prune.test} compares per-row right/wrong answers of single-label runs; "
            f"for a {task} study use an Optuna pruner (median, successive_halving, hyperband) or no pruning",
        )
    return StudySpec(
        path=path,
        name=name,
        base_raw=base_raw,
        fixed=fixed,
        points=points,
        search=search,
        sampler=({"optuna": "tpe", "random": "random"}[searches[0]] if searches else None),
        seeds=seeds,
        n_trials=n_trials,
        objectives=list(options.objectives),
        sampler_seed=options.sampler_seed,
        prune=prune,
        confirm=parse_confirm(path, raw.get("confirm")),
    )
