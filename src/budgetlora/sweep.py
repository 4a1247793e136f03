"""Sweeps: many trainings from one study file, resumable and shared by parallel workers.

A study file names a base config and the points to train (see docs/sweeps.md):

    base: ../configs/agnews-minilm-offline.yaml   # relative to the study file
    set: {train.max_steps: 200}                    # overrides for every trial
    grid: {lora.r: [1, 2], lora.targets: [[q, v], [q, k, v]]}   # cartesian product
    zip: {train.optimizer: [adamw, sgd], train.lr: [5.0e-4, 1.0e-2]}  # zipped lists
    seeds: [1, 2, 3]

or a search (`optuna:` = TPE, `random:`) over ranges with `n_trials:`.

Optuna is the engine: every trial lives in an Optuna study in a SQL storage (SQLite file
`OUT/study.db` by default). Grid points are enqueued as WAITING trials; a worker claims one by
moving it to RUNNING, and the storage lets only one worker win that move, so N processes (or
machines sharing a PostgreSQL URL) pull from one queue. Heartbeats turn the trials of killed
workers back into WAITING ones. Run directories are named after the point, so a finished
trial (summary.json present) is never trained twice, whatever happened to the storage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from budgetlora.config import (
    Config,
    config_from_dict,
    flatten,
    parse_override,
    read_yaml,
    resolve_paths,
    set_dotted,
)
from budgetlora.errors import BudgetLoraError, OverBudgetError

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
SKIPPED_FILE = "skipped.json"
TRIALS_FILE = "trials.json"
PARETO_FILE = "pareto.json"


# --------------------------------------------------------------------------------------------
# The study file


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


@dataclass
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
        raise _study_error(
            path, f"axis '{key}' must be a non-empty list of values (or a mapping label -> overrides)"
        )
    out = []
    for value in values:
        over = _dotted({key: value}, path, key, study_dir) if key != ALPHA_OVER_R else {key: value}
        if (
            key == "lora.r"
            and value != MAX_RANK
            and not (isinstance(value, int) and not isinstance(value, bool))
        ):
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
            [
                (part, over, {str(key): shown})
                for part, over, shown in _axis_values(path, str(key), values, study_dir)
            ]
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
            raise _study_error(
                path, "'zip' must be a mapping of config key -> list (or a list of such mappings)"
            )
        columns = {str(k): _axis_values(path, str(k), v, study_dir) for k, v in group.items()}
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise _study_error(
                path,
                "zipped lists must have the same length: "
                + ", ".join(f"{k} has {n}" for k, n in lengths.items()),
            )
        axis: Axis = []
        for row in zip(*columns.values()):
            over: dict[str, Any] = {}
            for _, o, _ in row:
                over.update(o)
            axis.append(
                (
                    "-".join(part for part, _, _ in row),
                    over,
                    {k: shown for k, (_, _, shown) in zip(columns, row)},
                )
            )
        axes.append(axis)
    return axes


def _search_space(path: Path, raw: Any) -> list[Param]:
    if not isinstance(raw, dict) or not raw:
        raise _study_error(
            path, "a search ('optuna:' or 'random:') must map config keys to value lists or ranges"
        )
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
                    f"search key '{key}': unknown range option(s) {sorted(unknown)}; "
                    "valid: low, high, log, step, type",
                )
            low, high = spec["low"], spec["high"]
            if (
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
                or low > high
            ):
                raise _study_error(path, f"search key '{key}': low/high must be numbers with low <= high")
            kind = spec.get("type") or ("int" if isinstance(low, int) and isinstance(high, int) else "float")
            if kind not in ("int", "float"):
                raise _study_error(path, f"search key '{key}': type must be int or float")
            space.append(
                Param(key, kind, low=low, high=high, log=bool(spec.get("log", False)), step=spec.get("step"))
            )
        else:
            raise _study_error(
                path, f"search key '{key}': give a list of choices or {{low: .., high: .., log: true}}"
            )
    return space


def _expand(axes: list[Axis], seeds: list[int] | None) -> list[Point]:
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
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BudgetLoraError(
            f"the study gives several points the same run name: {', '.join(dupes)} (a value listed twice?)"
        )
    return points


def load_study(
    path: str | Path, overrides: Sequence[str] | None = None, seeds: list[int] | None = None
) -> StudySpec:
    """Read and validate a study file; `overrides` are `--set KEY=VALUE` items (paths relative to
    CWD); `seeds` replaces the file's seeds (e.g. one seed for a quick check)."""
    path = Path(path)
    raw = read_yaml(path)
    study_dir = path.resolve().parent
    unknown = [k for k in raw if k not in STUDY_KEYS]
    if unknown:
        raise _study_error(path, f"unknown study key(s) {unknown}; valid: {', '.join(STUDY_KEYS)}")
    if "base" not in raw or not isinstance(raw["base"], str):
        raise _study_error(path, "'base' must name the base config file (relative to the study file)")
    base_path = (study_dir / raw["base"]).resolve()
    base_raw = read_yaml(base_path)
    resolve_paths(base_raw, base_path.parent)

    fixed = _dotted(raw.get("set"), path, "set", study_dir)
    cli_raw: dict[str, Any] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(cli_raw, key, value)
    resolve_paths(cli_raw, Path.cwd())
    cli = flatten(cli_raw)

    if seeds is not None:
        raw["seeds"] = seeds
    seeds = raw.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise _study_error(path, "'seeds' must be a non-empty list of integers")
    objectives = raw.get("objectives", ["val_acc"])
    if isinstance(objectives, str):
        objectives = [objectives]
    if (
        not isinstance(objectives, list)
        or not objectives
        or any(o not in OBJECTIVES for o in objectives)
        or len(set(objectives)) != len(objectives)
    ):
        raise _study_error(path, f"'objectives' must list distinct names from {', '.join(OBJECTIVES)}")
    searches = [k for k in ("optuna", "random") if k in raw]
    if len(searches) > 1 or (searches and ("grid" in raw or "zip" in raw)):
        raise _study_error(path, "use either grid/zip or one search ('optuna:' or 'random:'), not both")
    n_trials = raw.get("n_trials")
    if searches and not (isinstance(n_trials, int) and n_trials >= 1):
        raise _study_error(path, f"a '{searches[0]}:' search needs n_trials: N (N >= 1)")

    points: list[Point] = []
    search: list[Param] = []
    if searches:
        search = _search_space(path, raw[searches[0]])
        axis_keys = [p.key for p in search]
    else:
        # File order decides the name order, so `zip:` written first names first.
        axes: list[Axis] = []
        for key in raw:
            if key == "grid":
                axes += _grid_axes(path, raw["grid"], study_dir)
            elif key == "zip":
                axes += _zip_axes(path, raw["zip"], study_dir)
        points = _expand(axes, seeds)
        axis_keys = sorted({k for p in points for k in p.overrides})
    clash = sorted(set(cli) & (set(axis_keys) | ({"train.seed"} if seeds else set())))
    if clash:
        raise BudgetLoraError(
            f"--set {', '.join(clash)}: the study varies these keys; edit the study file instead"
        )
    fixed.update(cli)
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise _study_error(path, "'name' must be a plain word (letters, digits, . _ + -)")
    sampler_seed = raw.get("sampler_seed")
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
        objectives=list(objectives),
        sampler_seed=sampler_seed,
    )


# --------------------------------------------------------------------------------------------
# From a point to a checked Config


class _Counts:
    """Meta-model parameter counts keyed by what decides them (a grid repeats the same shapes)."""

    def __init__(self) -> None:
        self.reports: dict[str, Any] = {}
        self.ranks: dict[str, tuple[int, int]] = {}

    @staticmethod
    def key(cfg: Config, num_labels: int, with_rank: bool = True) -> str:
        lora = dataclasses.asdict(cfg.lora)
        if not with_rank:
            lora.pop("r")
        lora.pop("alpha"), lora.pop("dropout")
        return json.dumps(
            [cfg.model, cfg.mode, cfg.budget, lora, dataclasses.asdict(cfg.head), num_labels],
            sort_keys=True,
            default=str,
        )

    def max_rank(self, cfg: Config, num_labels: int) -> tuple[int, int]:
        from budgetlora.budget import max_rank

        key = self.key(cfg, num_labels, with_rank=False)
        if key not in self.ranks:
            assert cfg.budget is not None
            self.ranks[key] = max_rank(cfg, num_labels, cfg.budget)
        return self.ranks[key]

    def check(self, cfg: Config, num_labels: int) -> int | None:
        """Trainable count of a LoRA config (None for mode full); raises OverBudgetError."""
        from budgetlora.budget import check_budget, count_trainable
        from budgetlora.model import build_meta_model

        if cfg.mode == "full":
            return None
        key = self.key(cfg, num_labels)
        if key not in self.reports:
            self.reports[key] = count_trainable(build_meta_model(cfg, num_labels))
        check_budget(cfg, self.reports[key], num_labels)
        return self.reports[key].trainable


_COUNTS = _Counts()


def num_labels_for(cfg: Config) -> int:
    """The class count when the config tells it; else 2, the smallest head (as precheck_budget assumes)."""
    from budgetlora.recipe import known_num_labels

    return known_num_labels(cfg) or 2


def build_config(spec: StudySpec, overrides: dict[str, Any], name: str) -> Config:
    """Base config + study `set` + the point's overrides, with `lora.r: max` and alpha_over_r resolved.

    Raises OverBudgetError when no rank fits; the budget itself is checked by `check_point`."""
    over = {**spec.fixed, **overrides, "name": name}
    ratio = over.pop(ALPHA_OVER_R, None)
    wants_max = over.get("lora.r") == MAX_RANK
    if wants_max:
        over["lora.r"] = 1  # placeholder so the config validates; replaced below
    cfg = config_from_dict(spec.base_raw, over)
    if wants_max and cfg.mode == "full":  # no adapters: keep the base config's rank, not the placeholder
        over.pop("lora.r")
        cfg = config_from_dict(spec.base_raw, over)
    elif wants_max:
        if cfg.budget is None:
            raise BudgetLoraError(f"{name}: lora.r: max needs a budget (the config has budget: null)")
        rank, count = _COUNTS.max_rank(cfg, num_labels_for(cfg))
        if rank == 0:
            raise OverBudgetError(
                f"no rank fits: r=1 on {','.join(cfg.lora.targets)} already needs "
                f"{count:,} trainable parameters (budget {cfg.budget:,})"
            )
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=rank))
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            raise BudgetLoraError(f"{name}: {ALPHA_OVER_R} must be a positive number, got {ratio!r}")
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, alpha=float(ratio) * cfg.lora.r))
    return cfg


def check_point(cfg: Config) -> int | None:
    """The trainable-parameter count from the meta model (no weights, no data); raises OverBudgetError."""
    return _COUNTS.check(cfg, num_labels_for(cfg))


@dataclass
class Planned:
    point: Point
    cfg: Config
    trainable: int | None


def plan(spec: StudySpec) -> tuple[list[Planned], list[dict[str, Any]]]:
    """Every grid point as a checked Config, and the points skipped (over budget or invalid) with why."""
    runnable, skipped = [], []
    for point in spec.points:
        try:
            cfg = build_config(spec, point.overrides, point.name)
            trainable = check_point(cfg)
        except OverBudgetError as exc:
            skipped.append(_skip_record(point.name, point.axes, exc, spec))
            continue
        runnable.append(Planned(point, cfg, trainable))
    return runnable, skipped


def _skip_record(name: str, axes: dict[str, Any], exc: BudgetLoraError, spec: StudySpec) -> dict[str, Any]:
    message = str(exc)
    match = re.match(r"([\d,]+) trainable parameters exceed the budget of ([\d,]+)", message)
    record: dict[str, Any] = {"name": name, "axes": axes, "reason": message.splitlines()[0]}
    if match:
        record["trainable_params"] = int(match.group(1).replace(",", ""))
        record["budget"] = int(match.group(2).replace(",", ""))
    return record


# --------------------------------------------------------------------------------------------
# Optuna storage and study


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    return Path(url[len("sqlite:///") :])


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock among processes on this machine (or a shared file system) using one SQLite file.

    Claiming is already safe in the database (see open_storage); the lock also makes the
    enqueue-what-is-missing step and the n_trials count exact, so two workers starting together
    do not both enqueue every point."""
    if path is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: the database alone keeps claims exclusive
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_storage(url: str, heartbeat: int | None = 10) -> Any:
    """An Optuna RDBStorage; on SQLite every transaction takes the write lock up front.

    Optuna claims a WAITING trial by reading its state and then writing RUNNING. PostgreSQL and
    MySQL lock the row for that (SELECT ... FOR UPDATE); SQLite ignores FOR UPDATE and Python's
    sqlite3 starts the transaction only at the write, so two processes can both read WAITING and
    both "win" the trial (seen in practice: 7 of 200 trials claimed twice by two processes).
    BEGIN IMMEDIATE makes the read and the write one serialized transaction."""
    import optuna

    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 120}} if path is not None else {}
    with warnings.catch_warnings(), _file_lock(_lock_path(url)):
        warnings.simplefilter("ignore")  # heartbeats and their retry callback are flagged experimental
        kwargs: dict[str, Any] = {}
        if heartbeat:
            # Optuna 4.9 renamed the retry callback and its argument; >= 4 is supported.
            new = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
            retry = (
                optuna.storages.RetryHeartbeatStaleTrialCallback
                if new
                else optuna.storages.RetryFailedTrialCallback
            )
            kwargs = {
                "heartbeat_interval": int(heartbeat),
                "grace_period": 3 * int(heartbeat),
                ("heartbeat_stale_trial_callback" if new else "failed_trial_callback"): retry(max_retry=2),
            }
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    if path is not None:
        from sqlalchemy import event

        @event.listens_for(storage.engine, "connect")
        def _no_implicit_transactions(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy now issues BEGIN itself (below)

        @event.listens_for(storage.engine, "begin")
        def _begin_immediate(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        storage.engine.dispose()  # connections made before the listeners would keep the old behaviour
    return storage


def _lock_path(url: str) -> Path | None:
    path = _sqlite_path(url)
    return path.with_name(path.name + ".lock") if path is not None else None


def open_optuna_study(spec: StudySpec, storage: Any, study_name: str | None = None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler: optuna.samplers.BaseSampler
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.sampler_seed)
    name = study_name or spec.name
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=spec.directions,  # type: ignore[arg-type]
        sampler=sampler,
        load_if_exists=True,
    )
    stored = [d.name.lower() for d in study.directions]
    if stored != spec.directions:
        raise BudgetLoraError(
            f"study '{name}' in the storage optimizes {stored}, the study file asks for "
            f"{spec.directions} ({', '.join(spec.objectives)}); use another --out, "
            "--storage or study name"
        )
    return study


def _live(state: Any) -> bool:
    from optuna.trial import TrialState

    return state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)


def enqueue_missing(study: Any, points: Sequence[Planned]) -> int:
    """Enqueue every point that has no waiting, running or completed trial; returns how many.

    Points whose trials all failed are enqueued again: rerunning a sweep retries its failures."""
    have = {t.user_attrs.get("point") for t in study.get_trials(deepcopy=False) if _live(t.state)}
    added = 0
    for planned in points:
        if planned.point.name not in have:
            study.enqueue_trial(
                {}, user_attrs={"point": planned.point.name, "axes": _jsonable(planned.point.axes)}
            )
            added += 1
    return added


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------
# The worker


@contextlib.contextmanager
def _heartbeat(storage: Any, trial_id: int, interval: int | None) -> Iterator[None]:
    """Record the trial's heartbeat while it trains, so a killed worker's trial goes stale.

    Optuna does this itself only inside Study.optimize; a sweep claims trials with ask/tell."""
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a busy database must not kill training
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class SweepOptions:
    out: Path
    storage_url: str
    study_name: str | None = None
    heartbeat: int | None = 10
    verbose: bool = False
    poll_s: float = 2.0
    worker: str = ""
    trust_pickle: bool = False


@dataclass
class WorkerStats:
    trained: int = 0
    reused: int = 0
    failed: int = 0
    skipped: int = 0


def _say(opts: SweepOptions, message: str) -> None:
    prefix = f"[{opts.worker}] " if opts.worker else ""
    print(f"{prefix}{message}", flush=True)


def _summary_values(spec: StudySpec, summaries: Sequence[dict[str, Any]]) -> list[float]:
    accs = []
    for s in summaries:
        acc = s.get("best_val_acc")
        if acc is None and isinstance(s.get("val"), dict):
            acc = s["val"].get("accuracy")
        if acc is None:
            raise BudgetLoraError("the run has no validation accuracy to optimize (data.val_size: 0?)")
        accs.append(float(acc))
    values = {"val_acc": sum(accs) / len(accs), "trainable_params": float(summaries[0]["trainable_params"])}
    return [values[o] for o in spec.objectives]


def _config_differences(run_dir: Path, cfg: Config) -> list[str]:
    stored = flatten(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {})
    wanted = flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))


def train_or_reuse(cfg: Config, run_dir: Path, opts: SweepOptions) -> tuple[dict[str, Any], bool]:
    """The run's summary, training it unless `run_dir` already holds the finished run of this config."""
    from budgetlora.recipe import train_run

    if (run_dir / "summary.json").is_file():
        if (run_dir / "config.yaml").is_file():
            diff = _config_differences(run_dir, cfg)
            if diff:
                raise BudgetLoraError(
                    f"{run_dir} holds a finished run of a different config (differs in "
                    f"{', '.join(diff[:6])}); delete it or sweep into another --out"
                )
        return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")), True
    if run_dir.exists():
        if _resume(cfg, run_dir, opts):
            return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")), False
        shutil.rmtree(run_dir)  # left by a killed trial without a usable checkpoint: start again
    train_run(cfg, run_dir.parent, trust_pickle=opts.trust_pickle, verbose=opts.verbose, run_dir=run_dir)
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8")), False


def _resume(cfg: Config, run_dir: Path, opts: SweepOptions) -> bool:
    """Continue an interrupted trial from its checkpoint when the recipe can; False to start over."""
    from budgetlora import recipe

    resume_run = getattr(recipe, "resume_run", None)
    if (
        resume_run is None
        or not (run_dir / "checkpoints").is_dir()
        or not (run_dir / "config.yaml").is_file()
    ):
        return False
    if _config_differences(run_dir, cfg):
        return False
    try:
        resume_run(run_dir, trust_pickle=opts.trust_pickle, verbose=opts.verbose)
    except BudgetLoraError as exc:
        _say(opts, f"cannot resume {run_dir.name} ({str(exc).splitlines()[0]}); training it again")
        return False
    return (run_dir / "summary.json").is_file()


def _superseded_by(study: Any, trial: Any, point: str) -> int | None:
    """The number of a lower trial for the same point that is waiting, running or done.

    Two workers can enqueue the same point (different storages/locks, retries); the lowest live
    trial is the one that runs, every other copy steps aside."""
    for other in study.get_trials(deepcopy=False):
        if other.number < trial.number and other.user_attrs.get("point") == point and _live(other.state):
            return other.number
    return None


def _claim(study: Any, storage: Any, spec: StudySpec, opts: SweepOptions) -> Any | None:
    """A trial to run now, or None when there is nothing left to claim."""
    from optuna.trial import TrialState

    with _file_lock(_lock_path(opts.storage_url)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ask() warns when the storage has heartbeats (we record them)
        trials = study.get_trials(deepcopy=False)
        trial = None
        if any(t.state == TrialState.WAITING for t in trials):
            trial = study.ask()
        elif spec.sampler is not None:
            assert spec.n_trials is not None
            # Over-budget samples do not use up n_trials (TPE learns to avoid them; 20x caps a
            # space that is mostly over budget), nor do trials of dead workers, which are re-queued.
            counted = [
                t
                for t in trials
                if not {"skipped", "empty", "duplicate_of"} & set(t.user_attrs)
                and (t.state != TrialState.FAIL or "error" in t.user_attrs)
            ]
            if len(counted) < spec.n_trials and len(trials) < 20 * spec.n_trials:
                trial = study.ask()
        if trial is not None and opts.heartbeat:
            # At once, inside the lock: a RUNNING trial without any heartbeat never goes stale.
            storage.record_heartbeat(trial._trial_id)
        return trial


def _fail_stale(study: Any) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def _suggest(trial: Any, spec: StudySpec) -> dict[str, Any]:
    """The trial's overrides from the search space (Optuna stores lists as their joined labels)."""
    over = {}
    for p in spec.search:
        if p.kind == "categorical":
            labels = [_fmt_choice(c) for c in p.choices]
            label = trial.suggest_categorical(p.key, labels)
            over[p.key] = p.choices[labels.index(label)]
        elif p.kind == "int":
            over[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            over[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), log=p.log, step=p.step)
    return over


def _fmt_choice(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _search_name(trial: Any, spec: StudySpec, over: dict[str, Any]) -> str:
    parts = [f"t{trial.number:03d}"]
    for p in spec.search:
        value = over[p.key]
        if isinstance(value, float):
            value = float(f"{value:.3g}")
        parts.append(name_part(p.key, value))
    return "-".join(parts)


def run_trial(
    study: Any,
    trial: Any,
    spec: StudySpec,
    planned: dict[str, Planned],
    opts: SweepOptions,
    storage: Any,
    stats: WorkerStats,
) -> None:
    """Train one claimed trial (all its seeds in search mode) and tell Optuna the outcome."""
    from optuna.trial import TrialState

    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    point = trial.user_attrs.get("point")
    if spec.sampler is None:
        if point is None:  # ask() made a fresh trial because another worker took the last one
            trial.set_user_attr("empty", "the queue was empty when this trial was claimed")
            study.tell(trial, state=TrialState.PRUNED)
            return
        if point not in planned:
            trial.set_user_attr("error", "the point is no longer in the study file (or is over budget now)")
            study.tell(trial, state=TrialState.PRUNED)
            return
        jobs = [(point, planned[point].cfg)]
    else:
        over = _suggest(trial, spec)
        point = point or _search_name(trial, spec, over)
        trial.set_user_attr("point", point)
        seeds: list[int | None] = list(spec.seeds) if spec.seeds else [None]
        cfgs = []
        try:
            for seed in seeds:
                name = point if seed is None else f"{point}-seed{seed}"
                cfg = build_config(spec, {**over, **({} if seed is None else {"train.seed": seed})}, name)
                check_point(cfg)
                cfgs.append((name, cfg))
        except OverBudgetError as exc:
            trial.set_user_attr("skipped", str(exc).splitlines()[0])
            stats.skipped += 1
            _say(opts, f"skip {point}: {str(exc).splitlines()[0]}")
            study.tell(trial, state=TrialState.PRUNED)
            return
        except BudgetLoraError as exc:
            _fail(study, trial, point, exc, opts, stats)
            return
        jobs = cfgs
    lower = _superseded_by(study, trial, point)
    if lower is not None:
        trial.set_user_attr("duplicate_of", lower)
        study.tell(trial, state=TrialState.PRUNED)
        return
    trial.set_user_attr("run_dirs", [name for name, _ in jobs])
    summaries, reused = [], True
    start = time.perf_counter()
    try:
        with _heartbeat(storage, trial._trial_id, opts.heartbeat):
            for name, cfg in jobs:
                _say(opts, f"trial {trial.number}: {name}")
                summary, was_reused = train_or_reuse(cfg, opts.out / name, opts)
                summaries.append(summary)
                reused = reused and was_reused
        values = _summary_values(spec, summaries)
    except BaseException as exc:
        if isinstance(exc, Exception) and not _is_interrupt(exc):
            _fail(study, trial, point, exc, opts, stats)  # a failed trial is recorded, the sweep goes on
            return
        # Ctrl-C / kill: record it and stop this worker; a rerun retries (or resumes) the trial.
        trial.set_user_attr("error", "interrupted")
        study.tell(trial, state=TrialState.FAIL)
        raise
    test = [s["test"]["accuracy"] for s in summaries if isinstance(s.get("test"), dict)]
    trial.set_user_attr("reused", reused)
    trial.set_user_attr("trainable_params", summaries[0].get("trainable_params"))
    if test:
        trial.set_user_attr("test_acc", sum(test) / len(test))
    study.tell(trial, values)
    if reused:
        stats.reused += 1
        _say(opts, f"done  {point}: already finished, not retrained")
    else:
        stats.trained += 1
        shown = "  ".join(f"{o} {v:.4g}" for o, v in zip(spec.objectives, values))
        _say(
            opts,
            f"done  {point}: {shown}"
            + (f"  test_acc {sum(test) / len(test):.4f}" if test else "")
            + f"  ({time.perf_counter() - start:.0f} s)",
        )


def _is_interrupt(exc: BaseException) -> bool:
    """True for the recipe's RunInterrupted (a signal stopped training after a checkpoint)."""
    from budgetlora import errors

    interrupted = getattr(errors, "RunInterrupted", None)
    return interrupted is not None and isinstance(exc, interrupted)


def _fail(
    study: Any, trial: Any, point: str, exc: BaseException, opts: SweepOptions, stats: WorkerStats
) -> None:
    from optuna.trial import TrialState

    reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BudgetLoraError) else str(exc)
    trial.set_user_attr("error", reason)
    study.tell(trial, state=TrialState.FAIL)
    stats.failed += 1
    _say(opts, f"FAIL  {point}: {reason.splitlines()[0] if reason else type(exc).__name__}")


def work(spec: StudySpec, opts: SweepOptions, planned: list[Planned] | None = None) -> WorkerStats:
    """One worker: claim trials from the shared study until none is waiting or running.

    Waiting for other workers' running trials is deliberate: if one of them was killed, its
    trial goes stale after the heartbeat grace period and is re-queued, and this worker runs it."""
    from optuna.trial import TrialState

    if planned is None:
        planned, _ = plan(spec)
    storage = open_storage(opts.storage_url, opts.heartbeat)
    with _file_lock(_lock_path(opts.storage_url)):
        study = open_optuna_study(spec, storage, opts.study_name)
        if spec.sampler is None:
            added = enqueue_missing(study, planned)
            if added:
                _say(opts, f"queued {added} trial(s)")
    by_name = {p.point.name: p for p in planned}
    stats = WorkerStats()
    waiting_for: set[int] = set()
    while True:
        _fail_stale(study)
        trial = _claim(study, storage, spec, opts)
        if trial is None:
            running = {t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
            if running and opts.heartbeat:
                if running != waiting_for:
                    _say(
                        opts,
                        f"waiting for {len(running)} trial(s) running in other workers "
                        f"(taken over if their worker dies): {', '.join(map(str, sorted(running)))}",
                    )
                    waiting_for = running
                time.sleep(opts.poll_s)
                continue
            break
        run_trial(study, trial, spec, by_name, opts, storage, stats)
    return stats


# --------------------------------------------------------------------------------------------
# Outputs


def trial_records(study: Any) -> list[dict[str, Any]]:
    records = []
    for t in study.get_trials(deepcopy=False):
        if "point" not in t.user_attrs:
            continue
        records.append(
            {
                "number": t.number,
                "point": t.user_attrs["point"],
                "state": t.state.name,
                "values": t.values,
                "params": t.params,
                **{k: v for k, v in t.user_attrs.items() if k != "point"},
            }
        )
    return records


def pareto_front(study: Any, spec: StudySpec) -> list[dict[str, Any]]:
    """Optuna's non-dominated trials (accuracy up, trainable parameters down), by accuracy."""
    front = []
    for t in study.best_trials:
        front.append(
            {
                "point": t.user_attrs.get("point"),
                "run_dirs": t.user_attrs.get("run_dirs"),
                **dict(zip(spec.objectives, t.values)),
                "test_acc": t.user_attrs.get("test_acc"),
            }
        )
    return sorted(front, key=lambda r: -r.get("val_acc", 0.0))


def write_outputs(
    spec: StudySpec, opts: SweepOptions, skipped: list[dict[str, Any]], report: bool = False
) -> None:
    """skipped.json, trials.json, pareto.json (two objectives), results.csv/.md, optionally the report."""
    from budgetlora.results import atomic_write_text, display_table, markdown_table, write_results

    storage = open_storage(opts.storage_url, None)
    study = open_optuna_study(spec, storage, opts.study_name)
    records = trial_records(study)
    skipped = skipped + [
        {"name": r["point"], "axes": r.get("params", {}), "reason": r["skipped"]}
        for r in records
        if "skipped" in r
    ]
    atomic_write_text(opts.out / SKIPPED_FILE, json.dumps(skipped, indent=2) + "\n")
    atomic_write_text(opts.out / TRIALS_FILE, json.dumps(records, indent=2, default=str) + "\n")
    failed = [r for r in records if r["state"] == "FAIL" and not _retried(r, records)]
    if failed:
        print(f"{len(failed)} failed trial(s):")
        for r in failed:
            print(f"  {r['point']}: {str(r.get('error', 'worker died')).splitlines()[0]}")
    if len(spec.objectives) > 1 and any(r["state"] == "COMPLETE" for r in records):
        front = pareto_front(study, spec)
        atomic_write_text(opts.out / PARETO_FILE, json.dumps(front, indent=2) + "\n")
        print("Pareto front (" + " vs ".join(spec.objectives) + "):")
        for r in front:
            print("  " + r["point"] + "  " + "  ".join(f"{o} {r[o]:.6g}" for o in spec.objectives))
    try:
        table = write_results(opts.out)
    except BudgetLoraError as exc:
        print(f"no results table: {exc}")
        return
    print(markdown_table(display_table(table)), end="")
    print(f"wrote {opts.out / 'results.csv'}, results.md, {SKIPPED_FILE}, {TRIALS_FILE}")
    if report:
        from budgetlora.report import write_report

        print(f"wrote {write_report(opts.out)}")


def _retried(record: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    return any(
        r["point"] == record["point"] and r["number"] > record["number"] and r["state"] == "COMPLETE"
        for r in records
    )


def print_skipped(skipped: list[dict[str, Any]]) -> None:
    if not skipped:
        return
    print(f"skipping {len(skipped)} point(s) over the budget:")
    for record in skipped:
        print(f"  {record['name']}: {record['reason']}")


# --------------------------------------------------------------------------------------------
# Entry points


def run_sweep(
    study_path: str | Path,
    out: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    workers: int = 1,
    storage: str | None = None,
    heartbeat: int | None = 10,
    verbose: bool = False,
    report: bool = False,
    threads: int | None = None,
    study_name: str | None = None,
    trust_pickle: bool = False,
    seeds: list[int] | None = None,
) -> WorkerStats:
    """Run (or resume, or join) a sweep; with workers > 1 the other workers are child processes."""
    spec = load_study(study_path, overrides, seeds)
    out_dir = Path(out) if out is not None else Path("sweeps") / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = SweepOptions(
        out=out_dir,
        storage_url=storage or default_storage(out_dir),
        study_name=study_name,
        heartbeat=heartbeat,
        verbose=verbose,
        trust_pickle=trust_pickle,
        worker="w0" if workers > 1 else "",
    )
    planned, skipped = plan(spec)
    print_skipped(skipped)
    from budgetlora.results import atomic_write_text

    atomic_write_text(out_dir / SKIPPED_FILE, json.dumps(skipped, indent=2) + "\n")
    if spec.sampler is None:
        print(f"study {spec.name}: {len(planned)} point(s) to run, {len(skipped)} skipped; out {out_dir}")
    else:
        print(f"study {spec.name}: {spec.sampler} search, {spec.n_trials} trial(s); out {out_dir}")
    _set_threads(threads if threads else (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None))
    children = [
        _spawn_worker(study_path, opts, overrides, seeds, i, workers, threads) for i in range(1, workers)
    ]
    try:
        stats = work(spec, opts, planned)
    finally:
        for child in children:
            child.wait()
    bad = [c.returncode for c in children if c.returncode not in (0, None)]
    if bad:
        print(f"{len(bad)} worker process(es) exited with an error (codes {bad})", file=sys.stderr)
    write_outputs(spec, opts, skipped, report)
    return stats


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _spawn_worker(
    study_path: str | Path,
    opts: SweepOptions,
    overrides: Sequence[str] | None,
    seeds: list[int] | None,
    index: int,
    workers: int,
    threads: int | None,
) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "budgetlora",
        "sweep",
        str(study_path),
        "--out",
        str(opts.out),
        "--storage",
        opts.storage_url,
        "--heartbeat",
        str(opts.heartbeat or 0),
        "--threads",
        str(threads or max(1, (os.cpu_count() or 1) // workers)),
        "--as-worker",
        f"w{index}",
    ]
    for item in overrides or []:
        command += ["--set", item]
    if seeds:
        command += ["--seeds", ",".join(map(str, seeds))]
    if opts.study_name:
        command += ["--study-name", opts.study_name]
    if opts.verbose:
        command.append("--verbose")
    if opts.trust_pickle:
        command.append("--trust-pickle")
    return subprocess.Popen(command)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cmd_sweep(args: argparse.Namespace) -> int:
    # `kill` (SIGTERM) marks the running trial failed at once instead of waiting for its heartbeat to go stale.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    if args.workers < 1:
        raise BudgetLoraError("--workers must be >= 1")
    heartbeat = args.heartbeat or None
    if args.dry_run:
        return _dry_run(args)
    if args.as_worker:  # a child of `--workers N`: work only; the parent writes the outputs
        spec = load_study(args.study, args.set, args.seeds)
        out = Path(args.out) if args.out else Path("sweeps") / spec.name
        _set_threads(args.threads)
        work(
            spec,
            SweepOptions(
                out=out,
                storage_url=args.storage or default_storage(out),
                study_name=args.study_name,
                heartbeat=heartbeat,
                verbose=args.verbose,
                worker=args.as_worker,
                trust_pickle=args.trust_pickle,
            ),
        )
        return 0
    try:
        stats = run_sweep(
            args.study,
            args.out,
            args.set,
            args.workers,
            args.storage,
            heartbeat,
            args.verbose,
            args.report,
            args.threads,
            args.study_name,
            args.trust_pickle,
            args.seeds,
        )
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or _is_interrupt(exc):
            print("budgetlora: sweep interrupted; rerun the same command to resume it", file=sys.stderr)
            return 130
        raise
    print(
        f"this process: {stats.trained} trained, {stats.reused} already finished, {stats.failed} failed, "
        f"{stats.skipped} skipped"
    )
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    spec = load_study(args.study, args.set, args.seeds)
    if spec.sampler is not None:
        print(f"{spec.sampler} search over {', '.join(p.key for p in spec.search)}; {spec.n_trials} trials")
        return 0
    from budgetlora.recipe import known_num_labels

    planned, skipped = plan(spec)
    for p in planned:
        if p.cfg.mode == "full":
            print(f"{p.point.name}: mode full, every parameter trainable (the budget does not apply)")
            continue
        print(
            f"{p.point.name}: r={p.cfg.lora.r} alpha={p.cfg.lora.alpha:g} targets={','.join(p.cfg.lora.targets)} "
            f"trainable {p.trainable:,}"
        )
    print_skipped(skipped)
    if any(known_num_labels(p.cfg) is None for p in planned):
        print(
            "(class count not known from the config: counts assume a 2-class head; set data.label_names "
            "for exact ones)"
        )
    print(f"{len(planned)} point(s) to run, {len(skipped)} skipped")
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def add_subcommands(subparsers: Any) -> None:
    """Register `sweep` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "sweep",
        help="run a study file: grid/zip or Optuna search, resumable, parallel workers",
        description="Train every point of a study file (see docs/sweeps.md) into OUT/<point>/, then write "
        "OUT/results.csv/.md. Rerun the same command to resume; start more processes with the same "
        "--out/--storage to add workers.",
    )
    p.add_argument("study", help="study YAML (see studies/)")
    p.add_argument("--out", metavar="DIR", help="sweep folder (default: sweeps/<study name>)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage, any SQLAlchemy URL (default: sqlite:///OUT/study.db)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key in every trial")
    p.add_argument("--seeds", type=_seed_list, metavar="1,2,3", help="replace the study's seeds")
    p.add_argument("--study-name", help="Optuna study name (default: the study file's name)")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        metavar="S",
        help="seconds between heartbeats; a trial silent for 3x this is re-queued (0: off)",
    )
    p.add_argument("--threads", type=int, help="CPU threads per worker (default: cores / workers)")
    p.add_argument("--report", action="store_true", help="also write the report (plots, report.html)")
    p.add_argument(
        "--dry-run", action="store_true", help="list the points, their ranks and budget checks; train nothing"
    )
    p.add_argument("--verbose", action="store_true", help="show each trial's training progress")
    p.add_argument("--trust-pickle", action="store_true", help="allow pickle data files (runs code!)")
    p.add_argument("--as-worker", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_sweep)
