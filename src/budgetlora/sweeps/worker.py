"""A sweep worker: claim trials from the shared study and train them until none is waiting or
running. A trial's fate is decided in one place (`run_trial`, as Optuna's `_run_trial`): its
body raises Skip, Duplicate, RunPruned, RunInterrupted or an error, or returns the summaries,
and one `tell` records the outcome. Run directories are named after the point, so a finished
trial (summary.json present) is never trained twice, whatever happened to the storage."""

from __future__ import annotations

import json
import os
import traceback
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.summary import PrunedRecord
from budgetlora.config import Config
from budgetlora.errors import BudgetLoraError, OverBudgetError, RunInterrupted, RunPruned, first_line
from budgetlora.sweeps.options import SweepOptions, WorkerStats
from budgetlora.sweeps.plan import Planned, build_config, check_point, plan
from budgetlora.sweeps.prune import RungJudge
from budgetlora.sweeps.trial_runs import RunOutcome, summary_values, train_or_reuse
from budgetlora.sweeps.spec import StudySpec, name_part
from budgetlora.sweeps.storage import (
    enqueue_missing,
    fail_running,
    fail_stale,
    file_lock,
    heartbeat_for,
    is_done_or_live,
    lock_path,
    open_optuna_study,
    open_storage,
)


class Skip(Exception):
    """The sampled point is over the budget: not a trial to count."""


class Duplicate(Exception):
    """Another trial of the same point runs (or ran) already."""

    def __init__(self, of: int):
        super().__init__(f"duplicate of trial {of}")
        self.of = of


def _superseded_by(study: Any, trial: Any, point: str, out: Optional[Path] = None) -> Optional[int]:
    """The number of a lower trial for the same point that is waiting, running or settled.

    Two workers can enqueue the same point (different storages/locks, retries); the lowest live
    trial is the one that runs, every other copy steps aside."""
    for other in study.get_trials(deepcopy=False):
        if other.number < trial.number and other.user_attrs.get("point") == point and is_done_or_live(other, out):
            return other.number
    return None


MAX_SKIPPED_IN_A_ROW = 200  # a search whose samples keep landing over the budget stops here


def _claim(study: Any, storage: Any, spec: StudySpec, opts: SweepOptions) -> Optional[Any]:
    """A trial to run now, or None when there is nothing left to claim."""
    from optuna.trial import TrialState

    with file_lock(lock_path(opts.storage_url)), warnings.catch_warnings():
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
            recent = trials[-MAX_SKIPPED_IN_A_ROW:]
            hopeless = len(recent) == MAX_SKIPPED_IN_A_ROW and all("skipped" in t.user_attrs for t in recent)
            if hopeless:
                opts.console.say(
                    f"the last {MAX_SKIPPED_IN_A_ROW} sampled points were all over the budget: the search "
                    "stops (narrow the search space to configurations that fit)"
                )
            elif len(counted) < spec.n_trials and len(trials) < 20 * spec.n_trials:
                trial = study.ask()
        if trial is not None:
            heartbeat_for(storage, trial, opts.heartbeat).beat()  # at once, inside the lock
        return trial


def _suggest(trial: Any, spec: StudySpec) -> dict[str, Any]:
    """The trial's overrides from the search space (Optuna stores lists as their joined labels)."""
    over = {}
    for p in spec.search:
        if p.kind == "categorical":
            labels = [_fmt_choice(c) for c in p.choices]
            over[p.key] = p.choices[labels.index(trial.suggest_categorical(p.key, labels))]
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
        parts.append(name_part(p.key, float(f"{value:.3g}") if isinstance(value, float) else value))
    return "-".join(parts)


def _jobs(
    study: Any, trial: Any, spec: StudySpec, planned: dict[str, Planned], out: Optional[Path] = None
) -> tuple[str, list[tuple[str, Config]]]:
    """The point a trial stands for and the runs (name, config) it trains."""
    point = trial.user_attrs.get("point")
    if spec.sampler is None:
        if point is None:  # ask() made a fresh trial because another worker took the last one
            raise Skip("the queue was empty when this trial was claimed")
        if point not in planned:
            raise BudgetLoraError("the point is no longer in the study file (or is over budget now)")
        jobs = [(point, planned[point].cfg)]
    else:
        over = _suggest(trial, spec)
        point = point or _search_name(trial, spec, over)
        trial.set_user_attr("point", point)
        trial.set_user_attr("overrides", over)  # what the confirmation phase retrains
        jobs = []
        for seed in spec.seeds or [None]:
            name = point if seed is None else f"{point}-seed{seed}"
            cfg = build_config(spec, {**over, **({} if seed is None else {"train.seed": seed})}, name)
            check_point(cfg)
            jobs.append((name, cfg))
    lower = _superseded_by(study, trial, point, out)
    if lower is not None:
        raise Duplicate(lower)
    return point, jobs


def _train_jobs(
    study: Any, trial: Any, spec: StudySpec, jobs: list[tuple[str, Config]], opts: SweepOptions, storage: Any
) -> list[RunOutcome]:
    trial.set_user_attr("run_dirs", [name for name, _ in jobs])
    outcomes = []
    with heartbeat_for(storage, trial, opts.heartbeat, warn=opts.say):
        for name, cfg in jobs:
            opts.say(f"trial {trial.number}: {name}")
            asynchronous = spec.prune is not None and not (spec.sampler is None and spec.prune.synchronous)
            judge = RungJudge(spec.prune, study, trial, name, report=len(jobs) == 1) if asynchronous else None
            outcomes.append(train_or_reuse(cfg, opts.out / name, opts, judge))
    return outcomes


def run_trial(
    study: Any,
    trial: Any,
    spec: StudySpec,
    planned: dict[str, Planned],
    opts: SweepOptions,
    storage: Any,
    stats: WorkerStats,
) -> None:
    """Train one claimed trial (all its seeds in search mode) and tell Optuna its outcome, once."""
    from optuna.trial import TrialState

    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    point, start = trial.user_attrs.get("point") or f"trial {trial.number}", time.perf_counter()
    try:
        point, jobs = _jobs(study, trial, spec, planned, opts.out)
        outcomes = _train_jobs(study, trial, spec, jobs, opts, storage)
        values = summary_values(spec, outcomes)
    except Skip as exc:
        _settle(study, trial, TrialState.PRUNED, {"empty": str(exc)})
    except OverBudgetError as exc:
        stats.skipped += 1
        opts.say(f"skip {point}: {str(exc).splitlines()[0]}")
        _settle(study, trial, TrialState.PRUNED, {"skipped": str(exc).splitlines()[0]})
    except Duplicate as exc:
        _settle(study, trial, TrialState.PRUNED, {"duplicate_of": exc.of})
    except RunPruned as exc:
        stats.pruned += 1
        if rd.read_pruned(opts.out / (exc.run or point)) is None:
            rd.write_pruned(
                opts.out / (exc.run or point), PrunedRecord(exc.step, exc.reason, exc.val_acc, trial.number)
            )
        opts.say(f"PRUNE {point} at step {exc.step}: {exc.reason}")
        _settle(
            study,
            trial,
            TrialState.PRUNED,
            {"pruned_at": exc.step, "pruned_reason": exc.reason, "val_acc_at_prune": exc.val_acc},
        )
    except (RunInterrupted, KeyboardInterrupt):
        _settle(study, trial, TrialState.FAIL, {"error": "interrupted"})  # a rerun retries (or resumes) it
        raise
    except Exception as exc:  # noqa: BLE001 - the trial's fate, in one place (as Optuna's _run_trial)
        _fail_trial(study, trial, point, exc, opts, stats)
    else:
        finished = [o.summary for o in outcomes if o.summary is not None]
        test = [s.test.objective.value for s in finished if s.test is not None and s.test.n]  # the task's objective
        reused = all(o.reused for o in outcomes)
        attrs = {"reused": reused, "trainable_params": finished[0].trainable_params if finished else None}
        if test:
            attrs["test_acc"] = sum(test) / len(test)
        _settle(study, trial, TrialState.COMPLETE, attrs, values)
        if reused:
            stats.reused += 1
        else:
            stats.trained += 1
        shown = "  ".join(f"{o} {v:.4g}" for o, v in zip(spec.objectives, values, strict=False))
        opts.say(
            f"done  {point}: "
            + ("already finished, not retrained" if reused else f"{shown}  ({time.perf_counter() - start:.0f} s)")
            + _standing(study, spec)
        )


def _fail_trial(study: Any, trial: Any, point: str, exc: Exception, opts: SweepOptions, stats: WorkerStats) -> None:
    """A failed trial is recorded and the sweep goes on. An error that is not a BudgetLoraError is
    a bug: its traceback is kept in the trial record (`traceback`, printed with --verbose) and the
    sweep stops there unless asked to keep going (Optuna's `catch`)."""
    from optuna.trial import TrialState

    stats.failed += 1
    expected = isinstance(exc, BudgetLoraError)
    reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
    attrs = {"error": reason}
    if not expected:
        attrs["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    _settle(study, trial, TrialState.FAIL, attrs)
    opts.say(f"FAIL  {point}: {first_line(exc) if reason else type(exc).__name__}")
    if not expected and opts.verbose:
        opts.say(attrs["traceback"].rstrip())
    if not expected and not opts.keep_going:
        raise BudgetLoraError(
            f"trial {trial.number} ({point}) failed with an unexpected error ({reason.splitlines()[0][:200]}); "
            "its traceback is in the trial record (sweep --verbose prints it). The sweep stops here; "
            "pass --keep-going to go on past such failures"
        ) from exc


def _settle(study: Any, trial: Any, state: Any, attrs: dict[str, Any], values: Optional[list[float]] = None) -> None:
    """Record the trial's outcome. Another worker may have failed it meanwhile (its heartbeat went
    stale during a long stall): then the stored outcome stands and its re-queued copy finds this
    run's directory finished."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    except UpdateFinishedTrialError:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skip_if_finished says so when it skips
        if values is not None:
            study.tell(trial, values, skip_if_finished=True)
        else:
            study.tell(trial, state=state, skip_if_finished=True)


def _standing(study: Any, spec: StudySpec) -> str:
    """Trials settled so far and the best so far: the sweep's progress line."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if "point" in t.user_attrs]
    settled = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    total = spec.n_trials if spec.sampler else len({t.user_attrs["point"] for t in trials})
    if not done:
        return f"  [{len(settled)}/{total} settled]"
    best = max(done, key=lambda t: t.values[0] if spec.directions[0] == "maximize" else -t.values[0])
    return f"  [{len(settled)}/{total} settled; best {spec.objectives[0]} {best.values[0]:.4g}: {best.user_attrs['point']}]"


def work(spec: StudySpec, opts: SweepOptions, planned: Optional[list[Planned]] = None) -> WorkerStats:
    """One worker: claim trials from the shared study until none is waiting or running.

    Waiting for other workers' running trials is deliberate: if one of them was killed, its
    trial goes stale after the heartbeat grace period and is re-queued, and this worker runs it."""
    from optuna.trial import TrialState

    if planned is None:
        planned, _ = plan(spec)
    storage = open_storage(opts.storage_url, opts.heartbeat)
    with file_lock(lock_path(opts.storage_url)):
        study = open_optuna_study(spec, storage, opts.study_name)
        if not opts.heartbeat:
            fail_running(study, storage)
        if spec.sampler is None:
            added = enqueue_missing(study, planned, opts.out)
            if added:
                opts.say(f"queued {added} trial(s)")
    by_name = {p.point.name: p for p in planned}
    stats = WorkerStats()
    waiting_for: set[int] = set()
    while True:
        with file_lock(lock_path(opts.storage_url)):  # one worker re-queues a dead trial, not each
            fail_stale(study, storage, opts.heartbeat)
        trial = _claim(study, storage, spec, opts)
        if trial is None:
            running = {t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
            if running and opts.heartbeat:
                if running != waiting_for:
                    opts.say(
                        f"waiting for {len(running)} trial(s) running in other workers (taken over if "
                        f"their worker dies): {', '.join(map(str, sorted(running)))}"
                    )
                    waiting_for = running
                time.sleep(opts.poll_s)
                continue
            break
        run_trial(study, trial, spec, by_name, opts, storage, stats)
    return stats
