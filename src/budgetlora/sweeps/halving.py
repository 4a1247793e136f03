"""Synchronous successive halving over a grid's rungs.

Every point trains to the first rung and pauses there (its checkpoint and its per-row validation
outcomes saved in its run directory); once all have, each is compared with the rung's leader on
the same validation rows and pruned only when significantly behind (sweeps/prune.decide); the
survivors resume to the next rung, and after the last rung to full length. Each rung is an Optuna
study of its own in the sweep's storage (`<study>@<step>`), so any number of workers share it,
and a killed sweep resumes: a point paused at a rung is not trained again, a pruned one never.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from budgetlora import atomic, jsonfile
from budgetlora.artifacts import run_dir as rd
from budgetlora.artifacts.summary import PrunedRecord
from budgetlora.errors import BudgetLoraError
from budgetlora.sweeps.plan import Planned
from budgetlora.sweeps.prune import RungRecord, decide
from budgetlora.sweeps.spec import StudySpec
from budgetlora.sweeps.storage import file_lock, lock_path
from budgetlora.sweeps.worker import SweepOptions, WorkerStats, work

RUNG_DECISIONS = "rung-decisions.json"  # in the sweep folder: every rung's comparisons


def rung_study(spec: StudySpec, opts: SweepOptions, step: int) -> tuple[StudySpec, SweepOptions]:
    name = f"{opts.study_name or spec.name}@{step}"
    return (
        dataclasses.replace(spec, name=name, objectives=["val_acc"], confirm=None),
        dataclasses.replace(opts, study_name=name, pause_at=step),
    )


def _record(planned: Planned, opts: SweepOptions, step: int) -> RungRecord | None:
    """The point's outcomes at the rung; a missing or damaged record is no evidence (the point goes on)."""
    try:
        return RungRecord.read(rd.read_rung_from(opts.out / planned.point.name, step))
    except BudgetLoraError:
        return None


def decide_rung(
    spec: StudySpec, opts: SweepOptions, step: int, alive: list[Planned], population: list[Planned]
) -> tuple[list[Planned], int]:
    """The points of `alive` that go on from `step`; the others get their pruned.json. The
    decision depends only on the records of the whole `population` at this rung, so every worker,
    and a rerun after a crash, reaches the same one."""
    assert spec.prune is not None
    records = {p.point.name: r for p in population if (r := _record(p, opts, step)) is not None}
    survivors, pruned, lines = [], 0, []
    for planned in alive:
        name = planned.point.name
        record = records.get(name)
        if record is None:  # no outcomes at this rung (e.g. a run finished before pruning was on)
            survivors.append(planned)
            continue
        decision = decide(record, [r for other, r in records.items() if other != name], spec.prune)
        lines.append(
            {
                "point": name,
                "val_acc": record.accuracy,
                "pruned": decision.prune,
                "reason": decision.reason,
                "p_value": decision.p_value,
                "leader": decision.leader,
            }
        )
        if not decision.prune:
            survivors.append(planned)
            continue
        pruned += 1
        if rd.read_pruned(opts.out / name) is None:
            rd.write_pruned(
                opts.out / name,
                PrunedRecord(
                    step,
                    decision.reason,
                    record.accuracy,
                    leader=decision.leader,
                    p_value=decision.p_value,
                    trainable_params=planned.trainable,
                ),
            )
            opts.say(f"PRUNE {name} at step {step}: {decision.reason}")
    _write_rung_decisions(opts, step, lines)
    return survivors, pruned


def _write_rung_decisions(opts: SweepOptions, step: int, lines: list[dict[str, Any]]) -> None:
    path = opts.out / RUNG_DECISIONS
    with file_lock(lock_path(opts.storage_url)):
        try:
            decisions = jsonfile.read(path) if path.is_file() else {}
        except (OSError, BudgetLoraError):
            decisions = {}  # a damaged copy is rewritten from the records
        decisions = decisions if isinstance(decisions, dict) else {}
        earlier = decisions.get(str(step)) if isinstance(decisions.get(str(step)), list) else []
        fresh = {line["point"] for line in lines}  # a rerun decides only the points still alive: keep the rest
        decisions[str(step)] = [e for e in earlier if isinstance(e, dict) and e.get("point") not in fresh] + lines
        atomic.write_json(path, decisions)


def halve(spec: StudySpec, opts: SweepOptions, planned: list[Planned]) -> WorkerStats:
    """This worker's part of the whole halving: every rung, then the survivors to full length."""
    assert spec.prune is not None
    alive = [p for p in planned if rd.read_pruned(opts.out / p.point.name) is None]  # pruned by an earlier pass
    stats = WorkerStats()
    for step in spec.prune.rungs:
        if not alive:
            break
        phase_spec, phase_opts = rung_study(spec, opts, step)
        opts.say(f"rung at step {step}: {len(alive)} point(s)")
        phase = work(phase_spec, phase_opts, alive)  # its "trained" counts pauses, not finished runs
        stats.failed, stats.skipped = stats.failed + phase.failed, stats.skipped + phase.skipped
        alive, pruned = decide_rung(spec, opts, step, alive, planned)
        stats.pruned += pruned
    stats.add(work(spec, opts, alive))
    return stats


def work_study(spec: StudySpec, opts: SweepOptions, planned: list[Planned]) -> WorkerStats:
    """A worker on a whole study: through its rungs first when they are synchronous."""
    if spec.sampler is None and spec.prune is not None and spec.prune.synchronous:
        return halve(spec, opts, planned)
    return work(spec, opts, planned)
