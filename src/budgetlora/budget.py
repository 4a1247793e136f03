"""Exact trainable-parameter accounting and the largest-rank planner.

The count is what `requires_grad` says on the built model, never a formula: PEFT's own printout
counts a saved head twice in "all params", and formulas drift from what actually trains.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from torch import nn

from budgetlora.config import Config
from budgetlora.errors import OverBudgetError


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


_MODULE_KIND = [
    (r"attention\.self\.query|attention\.q_lin", "q"), (r"attention\.self\.key|attention\.k_lin", "k"),
    (r"attention\.self\.value|attention\.v_lin", "v"), (r"attention\.output\.dense|attention\.out_lin", "o"),
    (r"intermediate\.dense|ffn\.lin1", "ffn_in"), (r"layer\.\d+\.output\.dense|ffn\.lin2", "ffn_out"),
]


def _is_head(name: str) -> bool:
    return "modules_to_save" in name or bool(re.search(r"(^|\.)(pre_)?classifier\.", name))


def _category(name: str) -> str:
    kind = "head" if _is_head(name) else next(
        (k for pattern, k in _MODULE_KIND if re.search(pattern, name)), "other")
    for marker, label in ((".lora_A.", "lora_A"), (".lora_B.", "lora_B"), ("lora_magnitude", "dora_magnitude")):
        if marker in name:
            return f"{label}.{kind}"
    if kind == "head":
        return "head"
    if name.endswith("bias"):
        return "bias"
    return "other" if kind == "other" else f"weight.{kind}"


def count_trainable(model: nn.Module) -> BudgetReport:
    breakdown: dict[str, int] = {}
    trainable = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            key = _category(name)
            breakdown[key] = breakdown.get(key, 0) + param.numel()
    return BudgetReport(trainable, total, dict(sorted(breakdown.items())))


def _count_for_rank(cfg: Config, num_labels: int, r: int) -> int:
    from budgetlora.model import build_meta_model

    trial = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, r=r))
    return count_trainable(build_meta_model(trial, num_labels)).trainable


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
    r = 1 + (budget - c1) // slope
    count = _count_for_rank(cfg, num_labels, r)
    while count > budget and r > 1:  # guards against a non-affine pattern
        r -= 1
        count = _count_for_rank(cfg, num_labels, r)
    return r, count


def check_budget(cfg: Config, report: BudgetReport, num_labels: int) -> None:
    """Refuse a LoRA config over budget, naming the breakdown and the largest rank that fits."""
    if cfg.budget is None or cfg.mode == "full" or report.trainable <= cfg.budget:
        return
    r, count = max_rank(cfg, num_labels, cfg.budget)
    advice = (f"the largest rank that fits for targets {','.join(cfg.lora.targets)} is r={r} "
              f"({count:,} trainable): --set lora.r={r}") if r else \
        "no rank fits with these targets and head; freeze or shrink the head, or target fewer modules"
    raise OverBudgetError(
        f"{report.trainable:,} trainable parameters exceed the budget of {cfg.budget:,}; {advice}\n"
        + report.table())
