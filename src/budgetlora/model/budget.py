"""Exact trainable-parameter accounting, the largest-rank planner, and the budget check.

The count is what `requires_grad` says on the built model, never a formula: PEFT's own printout
counts a saved head twice in "all params", and formulas drift from what actually trains.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from torch import nn

from budgetlora.config import Config
from budgetlora.errors import OverBudgetError
from budgetlora.model.architectures import target_kind


@dataclass
class BudgetReport:
    trainable: int
    total: int
    breakdown: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        width = max([len(k) for k in self.breakdown] + [len("trainable")])
        lines = [f"{key:<{width}}  {value:>12,}" for key, value in self.breakdown.items()]
        lines.append(f"{'trainable':<{width}}  {self.trainable:>12,}")
        lines.append(f"{'total':<{width}}  {self.total:>12,}")
        return "\n".join(lines)


_PEFT_PREFIX = "base_model.model."


def _category(name: str, model_type: str, heads: list[str]) -> str:
    path = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
    is_head = "modules_to_save" in path or any(path == h or path.startswith(h + ".") for h in heads)
    kind = "head" if is_head else (target_kind(path, model_type) or "other")
    for marker, label in ((".lora_A.", "lora_A"), (".lora_B.", "lora_B"), ("lora_magnitude", "dora_magnitude")):
        if marker in path:
            return f"{label}.{kind}"
    if kind == "head":
        return "head"
    if path.endswith("bias"):
        return "bias"
    return "other" if kind == "other" else f"weight.{kind}"


def count_trainable(model: nn.Module) -> BudgetReport:
    from budgetlora.model.build import head_module_names

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    heads, model_type = head_module_names(base), getattr(base.config, "model_type", "")
    breakdown: dict[str, int] = {}
    trainable = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            key = _category(name, model_type, heads)
            breakdown[key] = breakdown.get(key, 0) + param.numel()
    return BudgetReport(trainable, total, dict(sorted(breakdown.items())))


class CountCache:
    """Meta-model counts keyed by what decides them (a sweep's grid repeats the same shapes)."""

    def __init__(self) -> None:
        self._reports: dict[str, BudgetReport] = {}

    def report(self, cfg: Config, num_labels: int) -> BudgetReport:
        from budgetlora.model.build import build_meta_model

        lora = dataclasses.asdict(cfg.lora)
        for irrelevant in ("alpha", "dropout", "dropout_position", "use_rslora"):
            lora.pop(irrelevant)
        key = json.dumps(
            [cfg.model, cfg.mode, lora, dataclasses.asdict(cfg.head), num_labels, cfg.data.max_length],
            sort_keys=True,
            default=str,
        )
        if key not in self._reports:
            self._reports[key] = count_trainable(build_meta_model(cfg, num_labels))
        return self._reports[key]


COUNTS = CountCache()


def _count_for_rank(cfg: Config, num_labels: int, r: int) -> int:
    trial = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=r))
    return COUNTS.report(trial, num_labels).trainable


def max_rank(cfg: Config, num_labels: int, budget: int) -> tuple[int, int]:
    """The largest uniform rank whose model fits `budget`, and its count; (0, count at r=1) if none.

    The count is affine in r (every adapted module adds r * (in + out)), so two meta-device builds
    give the slope; one more build confirms the answer."""
    c1 = _count_for_rank(cfg, num_labels, 1)
    slope = _count_for_rank(cfg, num_labels, 2) - c1
    if c1 > budget:
        return 0, c1
    if slope <= 0:
        return cfg.lora.r, c1
    r = min(4096, 1 + (budget - c1) // slope)
    count = _count_for_rank(cfg, num_labels, r)
    while count > budget and r > 1:  # guards against a non-affine pattern
        r -= 1
        count = _count_for_rank(cfg, num_labels, r)
    return r, count


def no_rank_fits(cfg: Config, count: int) -> str:
    return (
        f"no rank fits: r=1 on {','.join(cfg.lora.targets + cfg.lora.target_modules)} already needs "
        f"{count:,} trainable parameters (budget {cfg.budget:,}); freeze or shrink the head, or target "
        "fewer modules"
    )


def check_budget(cfg: Config, report: BudgetReport, num_labels: int) -> None:
    """Refuse a LoRA config over budget, naming the breakdown and the largest rank that fits."""
    if cfg.budget is None or cfg.mode == "full" or report.trainable <= cfg.budget:
        return
    r, count = max_rank(cfg, num_labels, cfg.budget)
    advice = (
        (
            f"the largest rank that fits for targets {','.join(cfg.lora.targets + cfg.lora.target_modules)} "
            f"is r={r} ({count:,} trainable): --set lora.r={r}"
        )
        if r
        else no_rank_fits(cfg, count)
    )
    raise OverBudgetError(
        f"{report.trainable:,} trainable parameters exceed the budget of {cfg.budget:,}; {advice}\n" + report.table(),
        trainable=report.trainable,
        budget=cfg.budget,
    )


def known_num_labels(cfg: Config) -> Optional[int]:
    """The class count when the config alone tells it (names, classes file, AG News format)."""
    from budgetlora.data.dataset import label_names_from_config
    from budgetlora.data.sources import detect_format
    from budgetlora.errors import BudgetLoraError

    names = label_names_from_config(cfg.data)
    if names:
        return len(names)
    if cfg.data.train_file and Path(cfg.data.train_file).is_file():
        try:
            if detect_format(Path(cfg.data.train_file), cfg.data.format) == "agnews":
                return 4
        except BudgetLoraError:
            return None
    return None


def precheck_budget(cfg: Config) -> Optional[BudgetReport]:
    """Build the model on the meta device before any data or weights load: refuses an unknown
    target, a pattern that selects nothing, a too-long max_length and an over-budget config.
    With the class count unknown, two classes (the smallest head) are assumed here and the exact
    count is checked again once the data has told it."""
    num_labels = known_num_labels(cfg) or 2
    report = COUNTS.report(cfg, num_labels)
    check_budget(cfg, report, num_labels)
    return report
