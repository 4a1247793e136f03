"""Statistically safe pruning: a trial stops at a rung (an evaluation step) only when it is
significantly worse than the rung's leader on the same validation rows.

In a grid sweep the rungs are synchronous successive halving (sweeps/halving.py): every trial
trains to the first rung and pauses there, then all are compared, the survivors go on to the next
rung, and so on. In a search (TPE, random), trials arrive one by one, so each is compared at a
rung with the trials that reached it before (asynchronous, as ASHA). Either way a trial is pruned
only when a paired one-sided test (exact McNemar, or a paired bootstrap) against the rung's leader
on the same validation rows gives p < alpha / m, m = points x rungs. The leader is chosen from the
data, so the guarantee is a union bound over every leader a point could face: the truly best point
(indeed any point that no other beats) is pruned at some rung with probability at most
rungs x (points - 1) x alpha / m < alpha. `eta` additionally keeps the top 1/eta of a rung whatever
the test says. Optuna's own pruners (median, successive halving, Hyperband; no statistics) are
available as `test:` options.

A pruned trial keeps its checkpoint: `budgetlora train --resume RUN` takes it to full length.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from budgetlora.config import Config, build_section
from budgetlora.config.schema import Range, opt
from budgetlora.errors import BudgetLoraError, RunPaused, RunPruned
from budgetlora.evaluate.stats import mcnemar_worse_pvalue, paired_bootstrap_worse_pvalue

STATISTICAL = ("mcnemar", "bootstrap")
OPTUNA_PRUNERS = ("median", "successive_halving", "hyperband")


@dataclass(frozen=True)
class PruneSpec:
    """The study file's `prune:` section (validated by the config's typed field machinery), with
    the Bonferroni count filled in once the sweep knows its points (`with_comparisons`)."""

    rungs: list[int] = opt(help="evaluation steps at which trials are compared", range=Range(1), factory=list)
    test: Literal["mcnemar", "bootstrap", "median", "successive_halving", "hyperband"] = opt(
        "mcnemar", "the paired test against the rung's leader, or one of Optuna's pruners"
    )
    alpha: float = opt(0.05, "family-wise error rate of the pruning decisions", range=Range(0, 0.5, low_open=True))
    eta: Optional[float] = opt(
        None, "keep the top 1/eta of a rung whatever the test says", range=Range(1, 100, low_open=True)
    )
    min_trials: int = opt(2, "trials at a rung before any is pruned (the leader and one more)", range=Range(2))
    comparisons: int = field(default=1, metadata={"internal": True})  # m of the Bonferroni correction

    def __post_init__(self) -> None:
        if len(set(self.rungs)) != len(self.rungs):
            raise BudgetLoraError("study key 'prune.rungs': lists a step twice")
        object.__setattr__(self, "rungs", sorted(self.rungs))
        if self.test in ("successive_halving", "hyperband") and self.eta is not None and self.eta != int(self.eta):
            raise BudgetLoraError(
                f"study key 'prune.eta': must be a whole number for Optuna's {self.test} pruner "
                "(its reduction factor), e.g. 3"
            )

    @property
    def synchronous(self) -> bool:
        """Rungs where every trial waits for the others (the statistical tests on a grid)."""
        return self.test in STATISTICAL

    def with_comparisons(self, runs: int) -> "PruneSpec":
        """The spec with m = runs x rungs, every comparison a sweep can make."""
        return dataclasses.replace(self, comparisons=max(1, runs * len(self.rungs)))

    def check(self, cfg: Config, name: str) -> None:
        """Every rung must come before the last step of the trial, with validation rows to compare."""
        last = cfg.train.max_steps
        if not cfg.data.val_size:
            raise BudgetLoraError(f"{name}: pruning compares validation outcomes; set data.val_size > 0")
        bad = [r for r in self.rungs if last is not None and r >= last]
        if bad:
            raise BudgetLoraError(f"{name}: prune rungs {bad} are not before the last step (train.max_steps {last})")

    def optuna_pruner(self) -> Any:
        import optuna

        if self.test == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.min_trials, n_warmup_steps=0)
        if self.test == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(
                min_resource=min(self.rungs), reduction_factor=int(self.eta or 3)
            )
        if self.test == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=min(self.rungs), reduction_factor=int(self.eta or 3))
        return optuna.pruners.NopPruner()


DEFAULT_CONFIRM_SEEDS = 3
MAX_CONFIRM_SEEDS, MAX_CONFIRM_TOP = 1000, 10_000


@dataclass(frozen=True)
class ConfirmSpec:
    """The study file's `confirm:` section: the `top` configurations, rerun with `seeds` (a count
    n means seeds 1..n)."""

    top: int = opt(1, "configurations to confirm", range=Range(1))
    seeds: Union[int, list[int]] = opt(
        help="a seed count, or the seeds",
        range=Range(0, 2**32 - 1),
        factory=lambda: list(range(1, DEFAULT_CONFIRM_SEEDS + 1)),
    )

    def __post_init__(self) -> None:
        count = self.seeds if isinstance(self.seeds, int) else len(self.seeds)
        if count > MAX_CONFIRM_SEEDS or self.top > MAX_CONFIRM_TOP:
            raise BudgetLoraError(
                f"study key 'confirm': at most {MAX_CONFIRM_TOP:,} configurations and "
                f"{MAX_CONFIRM_SEEDS:,} seeds each, got top {self.top:,} and {count:,} seeds"
            )
        seeds = list(range(1, self.seeds + 1)) if isinstance(self.seeds, int) else list(self.seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise BudgetLoraError("study key 'confirm.seeds': must be a count >= 1 or a list of distinct seeds")
        object.__setattr__(self, "seeds", seeds)


def _section(path: Path, cls: type, raw: Any, prefix: str) -> Any:
    try:
        return build_section(cls, raw, prefix, "study key")
    except BudgetLoraError as exc:
        raise BudgetLoraError(f"{path}: {exc}") from None


def parse_prune(path: Path, raw: Any) -> Optional[PruneSpec]:
    if raw is None:
        return None
    if isinstance(raw, dict) and not raw.get("rungs"):
        raise BudgetLoraError(
            f"{path}: study key 'prune.rungs': give the evaluation steps to compare at, e.g. [100, 200]"
        )
    return _section(path, PruneSpec, raw, "prune.")


def parse_confirm(path: Path, raw: Any) -> Optional[ConfirmSpec]:
    if raw is None:
        return None
    if isinstance(raw, dict) and "top" not in raw:
        raise BudgetLoraError(f"{path}: study key 'confirm.top': give the number of configurations to confirm")
    return _section(path, ConfirmSpec, raw, "confirm.")


@dataclass
class RungRecord:
    run: str
    step: int
    correct: np.ndarray  # per validation row: was the prediction right
    val_key: str  # identifies the validation rows (only records with the same rows are compared)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0

    def to_attr(self) -> dict[str, Any]:
        packed = base64.b64encode(np.packbits(self.correct.astype(bool)).tobytes()).decode("ascii")
        return {
            "run": self.run,
            "step": self.step,
            "n": int(len(self.correct)),
            "bits": packed,
            "val": self.val_key,
            "acc": self.accuracy,
        }

    @classmethod
    def from_attr(cls, data: dict[str, Any]) -> "RungRecord":
        bits = np.unpackbits(np.frombuffer(base64.b64decode(data["bits"]), dtype=np.uint8))[: int(data["n"])]
        return cls(str(data["run"]), int(data["step"]), bits.astype(bool), str(data["val"]))

    @classmethod
    def read(cls, data: Any) -> Optional["RungRecord"]:
        """The record, or None when it is missing or damaged (a damaged one is not evidence)."""
        if not isinstance(data, dict):
            return None
        try:
            record = cls.from_attr(data)
        except (KeyError, TypeError, ValueError, binascii.Error):
            return None
        return record if len(record.correct) == int(data["n"]) else None


@dataclass
class Decision:
    prune: bool
    reason: str
    leader: Optional[str] = None
    p_value: Optional[float] = None


def decide(candidate: RungRecord, others: list[RungRecord], spec: PruneSpec) -> Decision:
    """Prune `candidate` only if it is significantly behind the leader (and, with eta, outside the
    top 1/eta)."""
    peers = [
        r for r in others if r.step == candidate.step and r.val_key == candidate.val_key and r.run != candidate.run
    ]
    if len(peers) + 1 < spec.min_trials:
        return Decision(False, f"{len(peers) + 1} trial(s) at step {candidate.step}; fewer than {spec.min_trials}")
    ranked = sorted(peers + [candidate], key=lambda r: -r.accuracy)
    kept = max(1, math.ceil(len(ranked) / spec.eta)) if spec.eta else 1
    leader = ranked[0]
    if any(candidate is r for r in ranked[:kept]):
        return Decision(
            False,
            f"{'the leader' if kept == 1 else f'in the top {kept} of {len(ranked)}'} at step {candidate.step}",
            leader.run,
        )
    test = mcnemar_worse_pvalue if spec.test == "mcnemar" else paired_bootstrap_worse_pvalue
    p = test(candidate.correct, leader.correct)
    level = spec.alpha / max(1, spec.comparisons)
    verdict = (
        f"val acc {100 * candidate.accuracy:.2f}% vs {100 * leader.accuracy:.2f}% for {leader.run} at step "
        f"{candidate.step}; one-sided {spec.test} p={p:.2g} {'<' if p < level else '>='} "
        f"{spec.alpha:g}/{spec.comparisons} (Bonferroni)"
    )
    return Decision(
        p < level, ("significantly behind: " if p < level else "not significantly behind: ") + verdict, leader.run, p
    )


def _records(study: Any) -> list[RungRecord]:
    records = (
        RungRecord.read(value)
        for t in study.get_trials(deepcopy=False)
        for key, value in t.user_attrs.items()
        if key.startswith("rung:")
    )
    return [r for r in records if r is not None]


class RungPause:
    """The `on_eval` hook of a synchronous rung: at `step`, the run's outcomes go into its
    directory and the run pauses (RunPaused, after the rung's checkpoint is written)."""

    def __init__(self, run_dir: Path, step: int):
        self.run_dir, self.step = Path(run_dir), step

    def __call__(self, step: int, correct: np.ndarray, val_key: str) -> None:
        from budgetlora.artifacts import run_dir as rd

        # a run resumed past the rung (trained further before pruning was on) is judged where it stands
        if step == self.step or (step > self.step and rd.read_rung_from(self.run_dir, self.step) is None):
            record = RungRecord(self.run_dir.name, self.step, correct, val_key)
            rd.write_rung(self.run_dir, step, record.to_attr())
            raise RunPaused(step, record.accuracy)


class RungJudge:
    """The `on_eval` hook of one trial's run in an asynchronous search: records its outcomes at
    each rung and stops the run (RunPruned, after the rung's checkpoint is written) when the
    decision says so."""

    def __init__(self, spec: PruneSpec, study: Any, trial: Any, run: str, report: bool):
        self.spec, self.study, self.trial, self.run, self.report = spec, study, trial, run, report

    def __call__(self, step: int, correct: np.ndarray, val_key: str) -> None:
        accuracy = float(correct.mean()) if len(correct) else 0.0
        if self.report:  # intermediate values for Optuna's pruners and its plots
            self.trial.report(accuracy, step)
        if step not in self.spec.rungs:
            return
        record = RungRecord(self.run, step, correct, val_key)
        if self.spec.test in OPTUNA_PRUNERS:
            if self.report and self.trial.should_prune():
                raise RunPruned(
                    step,
                    f"Optuna {self.spec.test} pruner at step {step} (val acc {100 * accuracy:.2f}%)",
                    accuracy,
                    self.run,
                )
            return
        decision = decide(record, _records(self.study), self.spec)
        self.trial.set_user_attr(f"rung:{step}:{self.run}", record.to_attr())
        if decision.prune:
            raise RunPruned(step, decision.reason, accuracy, self.run)
