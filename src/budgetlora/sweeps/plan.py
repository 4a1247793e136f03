"""From a study point to a checked Config: `lora.r: max` and `lora.alpha_over_r` resolved, the
budget checked on the meta model (no weights, no data), so an over-budget point is skipped before
any trial trains."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from budgetlora.config import Config, config_from_dict
from budgetlora.errors import BudgetLoraError, OverBudgetError
from budgetlora.model.budget import COUNTS, check_budget, known_num_labels, max_rank, no_rank_fits
from budgetlora.sweeps.spec import ALPHA_OVER_R, MAX_RANK, Point, StudySpec


def num_labels_for(cfg: Config) -> int:
    """The class count when the config tells it; else 2, the smallest head (as train's precheck assumes)."""
    return known_num_labels(cfg) or 2


def build_config(spec: StudySpec, overrides: dict[str, Any], name: str) -> Config:
    """Base config + study `set` + the point's overrides, with `lora.r: max` and alpha_over_r resolved.

    Raises OverBudgetError when no rank fits; the budget itself is checked by `check_point`."""
    over = {**spec.fixed, **overrides, "name": name}
    if spec.prune is not None:  # every rung is an evaluation step of the trial (and of its resume)
        over["train.eval_at"] = sorted(set(over.get("train.eval_at") or []) | set(spec.prune.rungs))
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
        rank, count = max_rank(cfg, num_labels_for(cfg), cfg.budget)
        if rank == 0:
            raise OverBudgetError(no_rank_fits(cfg, count), trainable=count, budget=cfg.budget)
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=rank))
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
            raise BudgetLoraError(f"{name}: {ALPHA_OVER_R} must be a positive number, got {ratio!r}")
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, alpha=float(ratio) * cfg.lora.r))
    if spec.prune is not None:
        spec.prune.check(cfg, name)
    return cfg


def check_point(cfg: Config) -> int | None:
    """The trainable-parameter count from the meta model (None for mode full); raises OverBudgetError."""
    if cfg.mode == "full":
        return None
    num_labels = num_labels_for(cfg)
    report = COUNTS.report(cfg, num_labels)
    check_budget(cfg, report, num_labels)
    return report.trainable


@dataclass
class Planned:
    point: Point
    cfg: Config
    trainable: int | None


def plan(spec: StudySpec) -> tuple[list[Planned], list[dict[str, Any]]]:
    """Every grid point as a checked Config, and the points skipped (over budget) with why."""
    runnable, skipped = [], []
    for point in spec.points:
        try:
            cfg = build_config(spec, point.overrides, point.name)
            trainable = check_point(cfg)
        except OverBudgetError as exc:
            skipped.append(
                {
                    "name": point.name,
                    "axes": point.axes,
                    "reason": str(exc).splitlines()[0],
                    "trainable_params": exc.trainable,
                    "budget": exc.budget,
                }
            )
            continue
        runnable.append(Planned(point, cfg, trainable))
    return runnable, skipped
