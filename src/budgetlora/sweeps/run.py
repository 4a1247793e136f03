"""A whole sweep: plan, train (this process and N-1 worker processes on one storage), confirm the
best configurations with more seeds, and write the outputs: trials.json, skipped.json,
pareto.json, results.csv/.md with the verdict, best.yaml, and optionally the report."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from budgetlora import atomic, jsonfile
from budgetlora.artifacts import run_dir as rd
from budgetlora.errors import BudgetLoraError
from budgetlora.launch import python_command
from budgetlora.progress import Console
from budgetlora.sweeps.outputs import SKIPPED_FILE, SWEEP_FILES, finite_values, write_outputs
from budgetlora.sweeps.plan import Planned, plan
from budgetlora.sweeps.prune import ConfirmSpec, PruneSpec
from budgetlora.sweeps.spec import Point, StudySpec, load_study
from budgetlora.sweeps.storage import default_storage, open_optuna_study, open_storage
from budgetlora.sweeps.halving import work_study
from budgetlora.sweeps.worker import SweepOptions, WorkerStats, work

CONFIRM_DIR, CONFIRM_POINTS = "confirm", "points.json"


@dataclass
class SweepRequest:
    """What `budgetlora sweep` (or `budgetlora.sweep()`) was asked to do."""

    study: str | Path
    out: Optional[Path] = None
    overrides: list[str] = field(default_factory=list)
    seeds: Optional[list[int]] = None
    workers: int = 1
    storage: Optional[str] = None
    heartbeat: Optional[int] = 10
    verbose: bool = False
    report: bool = False
    threads: Optional[int] = None
    study_name: Optional[str] = None
    trust_pickle: bool = False
    prune: Optional[bool] = None  # None: as the study file says; True: on (default rungs); False: off
    confirm_top: Optional[int] = None
    confirm_seeds: Optional[int] = None
    console: Console = field(default_factory=Console)


@dataclass
class SweepOutcome:
    out: Path
    stats: WorkerStats
    lines: list[str]  # what the command prints: failures, the Pareto front, the table, the verdict


def load_request(request: SweepRequest) -> StudySpec:
    """The study as requested: pruning and confirmation from the file, overridden by the options."""
    spec = load_study(request.study, request.overrides, request.seeds)
    if request.prune is False:
        spec.prune = None
    elif request.prune and spec.prune is None:
        spec.prune = PruneSpec(rungs=[])  # rungs filled from the first point's evaluation steps
    if request.confirm_top is not None:
        seeds = list(range(1, (request.confirm_seeds or 3) + 1))
        spec.confirm = ConfirmSpec(request.confirm_top, seeds)
    elif request.confirm_seeds is not None:
        raise BudgetLoraError("--confirm-seeds needs --confirm-top K")
    return spec


def _default_rungs(spec: StudySpec) -> None:
    from budgetlora.sweeps.plan import build_config

    if spec.prune is None or spec.prune.rungs:
        return
    overrides = spec.points[0].overrides if spec.points else {}
    cfg = build_config(dataclasses.replace(spec, prune=None), overrides, "rungs")
    every, last = cfg.train.eval_every, cfg.train.max_steps
    if not every or last is None:
        raise BudgetLoraError("--prune needs train.eval_every and train.max_steps (or a prune: section with rungs)")
    spec.prune.rungs = list(range(every, last, every))
    if not spec.prune.rungs:
        raise BudgetLoraError(f"--prune: no evaluation step before the last one (train.eval_every {every}, "
                              f"train.max_steps {last}); evaluate more often or give prune.rungs")


def _prepare(spec: StudySpec) -> tuple[list[Planned], list[dict[str, Any]]]:
    """The checked points, and the Bonferroni count of the pruner: every run at every rung."""
    _default_rungs(spec)
    planned, skipped = plan(spec)
    if spec.prune is not None:
        runs = len(planned) if spec.sampler is None else (spec.n_trials or 1) * len(spec.seeds or [None])
        spec.prune.comparisons = max(1, runs * len(spec.prune.rungs))
    return planned, skipped


def _options(request: SweepRequest, out: Path, worker: str) -> SweepOptions:
    return SweepOptions(out=out, storage_url=request.storage or default_storage(out), study_name=request.study_name,
                        heartbeat=request.heartbeat, verbose=request.verbose, worker=worker,
                        trust_pickle=request.trust_pickle, console=request.console)


def _spawn_worker(request: SweepRequest, opts: SweepOptions, index: int, confirm_phase: bool) -> subprocess.Popen:
    threads = request.threads or max(1, (os.cpu_count() or 1) // request.workers)
    command = python_command("sweep", str(request.study), "--out", str(opts.out),
               "--storage", opts.storage_url, "--heartbeat", str(opts.heartbeat or 0), "--threads", str(threads),
               "--as-worker", f"w{index}")
    for item in request.overrides:
        command += ["--set", item]
    flags = {"--seeds": ",".join(map(str, request.seeds)) if request.seeds else None,
             "--study-name": request.study_name,
             "--confirm-top": request.confirm_top, "--confirm-seeds": request.confirm_seeds}
    command += [str(x) for k, v in flags.items() if v is not None for x in (k, v)]
    command += [flag for flag, on in (("--verbose", request.verbose), ("--trust-pickle", request.trust_pickle),
                                      ("--prune", request.prune is True), ("--no-prune", request.prune is False),
                                      ("--confirm-phase", confirm_phase)) if on]
    return subprocess.Popen(command)


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _phase(request: SweepRequest, spec: StudySpec, opts: SweepOptions, planned: list[Planned],
           confirm_phase: bool = False) -> WorkerStats:
    """This process works on the study while N-1 children do the same; returns this process's stats."""
    children = [_spawn_worker(request, opts, i, confirm_phase) for i in range(1, request.workers)]
    try:
        stats = work_study(spec, opts, planned)
    except BaseException:
        for child in children:  # their trials are re-queued by the next run (heartbeats go stale)
            child.terminate()
        raise
    finally:
        for child in children:
            child.wait()
    bad = [c.returncode for c in children if c.returncode not in (0, None)]
    if bad:
        opts.console.say(f"{len(bad)} worker process(es) exited with an error (codes {bad})")
    return stats


def confirm_spec(spec: StudySpec, out: Path) -> StudySpec:
    """The confirmation study: the points listed in OUT/confirm/points.json, no pruning."""
    path = out / CONFIRM_DIR / CONFIRM_POINTS
    raw = jsonfile.read(path)
    try:
        points = [Point(str(p["name"]), dict(p["overrides"]), dict(p.get("axes", {}))) for p in raw]
    except (TypeError, KeyError, ValueError, AttributeError):
        raise BudgetLoraError(f"{path}: not the list of points budgetlora wrote; the file is damaged "
                              "(delete it to choose the confirmation points again)") from None
    return dataclasses.replace(spec, name=f"{spec.name}-confirm", points=points, search=[], sampler=None,
                               seeds=None, n_trials=None, prune=None, objectives=["val_acc"])


def _plan_confirmation(spec: StudySpec, opts: SweepOptions) -> Optional[StudySpec]:
    """The K best completed points by the first objective, each once per confirmation seed."""
    from optuna.trial import TrialState

    assert spec.confirm is not None
    study = open_optuna_study(spec, open_storage(opts.storage_url, None), opts.study_name)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
            and finite_values(t.values) is not None]
    if not done:
        return None
    sign = -1 if spec.directions[0] == "maximize" else 1
    best = sorted(done, key=lambda t: sign * t.values[0])[: spec.confirm.top]
    planned = {p.point.name: p for p in plan(spec)[0]}
    points = []
    for trial in best:
        name = trial.user_attrs["point"]
        if name in planned:
            base = planned[name].point.overrides
        elif isinstance(trial.user_attrs.get("overrides"), dict):
            base = trial.user_attrs["overrides"]
        else:
            raise BudgetLoraError(f"trial {trial.number} ({name}) has no stored search values to confirm (it was "
                                  "trained by an older budgetlora); rerun the search into a new --out")
        for seed in spec.confirm.seeds:
            points.append({"name": f"{name}-seed{seed}", "overrides": {**base, "train.seed": seed},
                           "axes": {"config": name, "seed": seed}})
    atomic.write_json(opts.out / CONFIRM_DIR / CONFIRM_POINTS, points)
    return confirm_spec(spec, opts.out)


def run_sweep(request: SweepRequest) -> SweepOutcome:
    """Run (or resume, or join) a sweep; with workers > 1 the other workers are child processes."""
    spec = load_request(request)
    if request.workers < 1:
        raise BudgetLoraError("--workers must be >= 1")
    if request.workers > 1 and not request.heartbeat:
        raise BudgetLoraError("--workers > 1 needs heartbeats (--heartbeat N > 0): without them a worker cannot "
                              "tell another's running trial from one left by a killed worker")
    out = Path(request.out).expanduser() if request.out is not None else Path("sweeps") / spec.name
    inside = rd.inside_run(out)
    if inside is not None:
        raise BudgetLoraError(f"--out {out} is inside the run {inside}; a sweep needs a folder of its own")
    report_files: tuple[str, ...] = ()
    if request.report:
        from budgetlora.results.report import REPORT_FILES as report_files
    atomic.OutputFolder(out).claim(SWEEP_FILES + report_files)  # a user's own results.md is never written over
    if request.storage:
        open_storage(request.storage, request.heartbeat)  # a bad --storage fails before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = atomic.file_in_the_way(out / "x")
        raise BudgetLoraError(f"--out {out}: " + (f"{blocker} is a file, not a folder" if blocker is not None
                                                   else str(exc.strerror or exc))) from None
    opts = _options(request, out, "w0" if request.workers > 1 else "")
    planned, skipped = _prepare(spec)
    if skipped:
        request.console.say(f"skipping {len(skipped)} point(s) over the budget:")
    for record in skipped:
        request.console.say(f"  {record['name']}: {record['reason']}")
    atomic.OutputFolder(out, overwrite=True).write_json(SKIPPED_FILE, skipped)
    what = f"{len(planned)} point(s) to run, {len(skipped)} skipped" if spec.sampler is None else \
        f"{spec.sampler} search, {spec.n_trials} trial(s)"
    pruning = f"; pruning at steps {spec.prune.rungs} ({spec.prune.test})" if spec.prune else ""
    request.console.say(f"study {spec.name}: {what}{pruning}; out {out}")
    _set_threads(request.threads or (max(1, (os.cpu_count() or 1) // request.workers) if request.workers > 1 else None))
    stats = _phase(request, spec, opts, planned)
    confirmation = _plan_confirmation(spec, opts) if spec.confirm is not None else None
    if confirmation is not None:
        request.console.say(f"confirming the {spec.confirm.top} best with seeds {spec.confirm.seeds}")
        copts = dataclasses.replace(opts, out=out / CONFIRM_DIR, study_name=f"{request.study_name or spec.name}-confirm")
        _phase(request, confirmation, copts, plan(confirmation)[0], confirm_phase=True)
    return SweepOutcome(out, stats, write_outputs(spec, opts, skipped, request.report, confirmation is not None))


def run_worker(request: SweepRequest, worker: str, confirm_phase: bool) -> WorkerStats:
    """A child of `--workers N`: work only; the parent plans the confirmation and writes the outputs."""
    spec = load_request(request)
    out = Path(request.out) if request.out is not None else Path("sweeps") / spec.name
    _set_threads(request.threads)
    opts = _options(request, out, worker)
    if confirm_phase:
        return work(confirm_spec(spec, out), dataclasses.replace(
            opts, out=out / CONFIRM_DIR, study_name=f"{request.study_name or spec.name}-confirm"))
    return work_study(spec, opts, _prepare(spec)[0])
