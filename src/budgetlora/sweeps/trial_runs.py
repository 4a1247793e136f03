"""A trial's runs: each trained, resumed, or taken as it stands from its directory (finished,
paused at a rung, pruned), decided by one look at the run's status (artifacts.run_dir.run_status)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.placement import RunLock, check_replaceable
from budgetlora.artifacts.summary import RunSummary
from budgetlora.config import Config
from budgetlora.errors import BudgetLoraError, NotResumable, RunPaused, RunPruned
from budgetlora.sweeps.options import SweepOptions
from budgetlora.sweeps.spec import StudySpec


@dataclass(frozen=True)
class RunOutcome:
    """What a trial's run gave: its summary when it finished, or where it paused at a rung."""

    summary: Optional[RunSummary]
    paused: Optional[rd.Paused]
    reused: bool

    @property
    def val_acc(self) -> Optional[float]:
        return self.summary.val_acc if self.summary is not None else (self.paused.val_acc if self.paused else None)


def summary_values(spec: StudySpec, outcomes: list[RunOutcome]) -> list[float]:
    """The objective values of a trial's runs (one per seed): mean validation accuracy, and the
    trainable count (a run paused at a rung has no summary: the planner's count stands in)."""
    accs = [o.val_acc for o in outcomes]
    if any(a is None for a in accs):
        raise BudgetLoraError("the run has no validation accuracy to optimize (data.val_size: 0?)")

    def trainable() -> float:
        finished = [o.summary.trainable_params for o in outcomes if o.summary is not None]
        if not finished:
            raise BudgetLoraError(
                "a run paused at a rung has no trainable count; objectives of paused runs use val_acc only"
            )
        return float(finished[0])

    values = {"val_acc": lambda: sum(a for a in accs if a is not None) / len(accs), "trainable_params": trainable}
    return [values[o]() for o in spec.objectives]


def _free_overrides(run_dir: Path, cfg: Config) -> list[str]:
    """--set items that move a stored run's free keys (device, threads, ...) to this sweep's values."""
    from budgetlora.config import flatten
    from budgetlora.resuming import RESUME_FREE_KEYS

    stored, wanted = flatten(rd.read_run_config(run_dir).to_dict()), flatten(cfg.to_dict())
    return [f"{k}={json.dumps(wanted[k])}" for k in RESUME_FREE_KEYS if k in wanted and stored.get(k) != wanted[k]]


def _discard(run_dir: Path) -> None:
    """Remove an unfinished run left by a killed trial so it can be trained again, never anything
    that is not a run directory, and never while another process writes it."""
    check_replaceable(run_dir, "train over")
    trash = run_dir.with_name(f".{run_dir.name}.discard-{os.getpid()}")
    with RunLock(run_dir, "train it again"):
        if rd.is_finished(run_dir):  # another worker finished it meanwhile: keep it
            return
        os.replace(run_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def train_or_reuse(cfg: Config, run_dir: Path, opts: SweepOptions, on_eval: Any = None) -> RunOutcome:
    """The run's outcome, training it unless `run_dir` already holds the finished run of this
    config (or, at a synchronous rung, the run paused there): one decision on the run's status."""
    from budgetlora.resuming import RESUME_FREE_KEYS
    from budgetlora.sweeps.prune import RungPause

    judging = on_eval is not None or opts.pause_at is not None
    status = rd.run_status(run_dir, cfg, opts.pause_at, RESUME_FREE_KEYS)
    match status:
        case rd.Finished(config_diff=diff) if diff:
            raise BudgetLoraError(
                f"{run_dir} holds a finished run of a different config (differs in "
                f"{', '.join(diff[:6])}); delete it or sweep into another --out"
            )
        case rd.Finished(summary=summary):
            return RunOutcome(summary, None, reused=True)
        case rd.Pruned(record=record) if judging:  # settled by an earlier pass of this sweep
            raise RunPruned(record.step, record.reason, record.val_acc, run_dir.name)
        case rd.Paused():
            return RunOutcome(None, status, reused=True)
    if opts.pause_at is not None:
        on_eval = RungPause(run_dir, opts.pause_at)
    resumable = isinstance(status, (rd.Unfinished, rd.Pruned)) and status.resumable
    try:
        return _train_run(cfg, run_dir, opts, on_eval, resumable, fresh=isinstance(status, rd.Absent))
    except RunPaused:
        paused = rd.run_status(run_dir, pause_at=opts.pause_at or 0)
        if not isinstance(paused, rd.Paused):
            raise BudgetLoraError(f"{run_dir} paused at a rung but recorded no accuracy there") from None
        return RunOutcome(None, paused, reused=False)


def _train_run(
    cfg: Config, run_dir: Path, opts: SweepOptions, on_eval: Any, resumable: bool, fresh: bool
) -> RunOutcome:
    """Resume the run (when it can), else start it again (a leftover is discarded first)."""
    from budgetlora.recipe import train_run
    from budgetlora.resuming import resume_run

    if resumable:
        try:
            resume_run(
                run_dir,
                overrides=_free_overrides(run_dir, cfg),
                trust_pickle=opts.trust_pickle,
                verbose=opts.verbose,
                on_eval=on_eval,
            )
            return RunOutcome(rd.read_summary(run_dir), None, reused=False)
        except NotResumable as exc:  # anything else (disk full, busy, tracker down) is the trial's fate
            opts.say(f"cannot resume {run_dir.name} ({str(exc).splitlines()[0]}); training it again")
    if not fresh:
        _discard(run_dir)
        if rd.is_finished(run_dir):  # another worker finished it meanwhile
            return RunOutcome(rd.read_summary(run_dir), None, reused=True)
    train_run(
        cfg, run_dir.parent, trust_pickle=opts.trust_pickle, verbose=opts.verbose, run_dir=run_dir, on_eval=on_eval
    )
    return RunOutcome(rd.read_summary(run_dir), None, reused=False)
