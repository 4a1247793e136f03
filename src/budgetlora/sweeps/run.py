"""A whole sweep: plan, train (this process and N-1 worker processes on one storage), confirm the
best configurations with more seeds, and write the outputs: trials.json, skipped.json,
pareto.json, results.csv/.md with the verdict, best.yaml, and optionally the report."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from budgetlora import atomic, jsonfile
from budgetlora.artifacts import run_dir as rd
from budgetlora.config import coerce_value
from budgetlora.config.schema import Range, opt
from budgetlora.errors import BudgetLoraError, first_line, run_reporting_errors
from budgetlora.launch import python_call
from budgetlora.progress import Console
from budgetlora.sweeps.outputs import SKIPPED_FILE, SWEEP_FILES, finite_values, write_outputs
from budgetlora.sweeps.plan import Planned, plan
from budgetlora.sweeps.prune import DEFAULT_CONFIRM_SEEDS, ConfirmSpec, PruneSpec
from budgetlora.sweeps.spec import Point, StudySpec, load_study
from budgetlora.sweeps.storage import JOURNAL_PREFIX, default_storage, open_optuna_study, open_storage
from budgetlora.sweeps.halving import work_study
from budgetlora.sweeps.worker import SweepOptions, WorkerStats, work

CONFIRM_DIR, CONFIRM_POINTS = "confirm", "points.json"


DEFAULT_HEARTBEAT_S = 10
STORAGE_DRIVERS = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary] (pip install 'budgetlora[postgres]')",
    "pymysql": "PyMySQL",
    "mysqldb": "mysqlclient",
    "asyncpg": "asyncpg",
}


@dataclass(frozen=True)
class SweepRequest:
    """What `budgetlora sweep` (or `budgetlora.sweep()`) was asked to do: validated once, here,
    with the config's typed field machinery (wording: "sweep option 'workers': ..."), immutable
    after, and sent to child workers as JSON (`to_json` / `from_json`)."""

    study: Path = opt(Path("study.yaml"), "the study file")
    out: Optional[Path] = opt(None, "the sweep folder (default sweeps/<study name>)")
    overrides: list[str] = opt(help="KEY=VALUE items for every trial", factory=list)
    seeds: Optional[list[int]] = opt(None, "replaces the study's seeds", range=Range(0, 2**32 - 1))
    workers: int = opt(1, "worker processes on this machine", range=Range(1, 1024))
    storage: Optional[str] = opt(None, "the Optuna storage URL (default sqlite:///OUT/study.db)")
    heartbeat: Optional[int] = opt(
        DEFAULT_HEARTBEAT_S, "seconds between heartbeats (0 or None: off)", range=Range(0, 86400)
    )
    verbose: bool = opt(False, "each trial's training progress, and the traceback of a trial's unexpected error")
    report: bool = opt(False, "also write the report")
    threads: Optional[int] = opt(None, "CPU threads per worker", range=Range(1, 4096))
    study_name: Optional[str] = opt(None, "the Optuna study's name")
    trust_pickle: bool = opt(False, "allow pickle data files")
    prune: Optional[bool] = opt(None, "None: as the study file says; True: on; False: off")
    confirm_top: Optional[int] = opt(None, "configurations to confirm with more seeds", range=Range(1, 10_000))
    confirm_seeds: Optional[int] = opt(None, "seeds per confirmed configuration", range=Range(1, 1000))
    keep_going: bool = opt(False, "go on after a trial fails with an unexpected error (a bug), as after any other")
    console: Console = field(default_factory=Console, compare=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(SweepRequest)
        for f in dataclasses.fields(self):
            if f.metadata.get("internal") or f.name in ("study", "out"):
                continue
            value = getattr(self, f.name)
            if f.name in ("overrides", "seeds") and isinstance(value, tuple):
                value = list(value)
            if f.name == "overrides" and not isinstance(value, list):  # a lone string would split at its commas
                raise BudgetLoraError(
                    f"sweep option 'overrides': expected a list of \"KEY=VALUE\" strings, got {value!r}"
                )
            object.__setattr__(
                self, f.name, coerce_value(value, hints[f.name], f.name, f.metadata.get("range"), "sweep option")
            )
        for name in ("study", "out"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _path(value, name))
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise BudgetLoraError("sweep option 'seeds': give at least one seed, each once")
        if self.confirm_seeds is not None and self.confirm_top is None:
            raise BudgetLoraError("sweep option 'confirm_seeds' needs confirm_top (--confirm-top K)")
        if self.workers > 1 and not self.heartbeat:
            raise BudgetLoraError(
                "--workers > 1 needs heartbeats (--heartbeat N > 0): without them a worker cannot "
                "tell another's running trial from one left by a killed worker"
            )
        if self.storage is not None:
            check_storage_url(self.storage)

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}
        return {**data, "study": str(self.study), "out": str(self.out) if self.out is not None else None}

    @classmethod
    def from_json(cls, data: Any, console: Optional[Console] = None) -> "SweepRequest":
        if not isinstance(data, dict):
            raise BudgetLoraError("a sweep request must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BudgetLoraError(f"unknown sweep option(s) {unknown}")
        return cls(**data, console=console or Console())


def _path(value: Any, what: str) -> Path:
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)) or not os.fspath(value).strip():
        raise BudgetLoraError(f"sweep option '{what}': expected a path, got {value!r}")
    return Path(os.fspath(value)).expanduser()


def check_storage_url(url: str) -> None:
    """A storage URL names a journal file or a SQLAlchemy database whose driver is installed: a
    missing driver is one line naming its package (SQLAlchemy says only that it cannot import it)."""
    if url.startswith(JOURNAL_PREFIX):
        if not url[len(JOURNAL_PREFIX) :].strip():
            raise BudgetLoraError("--storage journal:PATH needs a file path")
        return
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    except ImportError:  # no SQLAlchemy: Optuna itself is missing, which the sweep reports
        return
    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise BudgetLoraError(
            f"--storage {url}: not a database URL SQLAlchemy knows ({first_line(exc, 120)}); give "
            "sqlite:///PATH, postgresql+psycopg://..., mysql+pymysql://... or journal:PATH"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError:
        driver = parsed.get_driver_name()
        package = STORAGE_DRIVERS.get(driver, driver)
        raise BudgetLoraError(
            f"--storage {parsed.render_as_string(hide_password=True)}: the {parsed.get_backend_name()} "
            f"driver '{driver}' is not installed: pip install {package}"
        ) from None


@dataclass
class SweepOutcome:
    out: Path
    stats: WorkerStats
    lines: list[str]  # what the command prints: failures, the Pareto front, the table, the verdict


def load_request(request: SweepRequest) -> StudySpec:
    """The study as requested, complete and frozen: pruning and confirmation from the file,
    overridden by the request, the rungs filled in (the first point's evaluation steps when the
    file names none) and the Bonferroni count of the pruner set (every run at every rung)."""
    spec = load_study(request.study, request.overrides, request.seeds)
    prune, confirm = spec.prune, spec.confirm
    if request.prune is False:
        prune = None
    elif request.prune and prune is None:
        prune = PruneSpec(rungs=_default_rungs(spec))
    if request.confirm_top is not None:
        confirm = ConfirmSpec(request.confirm_top, request.confirm_seeds or DEFAULT_CONFIRM_SEEDS)
    spec = dataclasses.replace(spec, prune=prune, confirm=confirm)
    if prune is None:
        return spec
    runs = len(plan(spec)[0]) if spec.sampler is None else (spec.n_trials or 1) * len(spec.seeds or [None])
    return dataclasses.replace(spec, prune=prune.with_comparisons(runs))


def _default_rungs(spec: StudySpec) -> list[int]:
    from budgetlora.sweeps.plan import build_config

    overrides = spec.points[0].overrides if spec.points else {}
    cfg = build_config(dataclasses.replace(spec, prune=None), overrides, "rungs")
    every, last = cfg.train.eval_every, cfg.train.max_steps
    if not every or last is None:
        raise BudgetLoraError("--prune needs train.eval_every and train.max_steps (or a prune: section with rungs)")
    rungs = list(range(every, last, every))
    if not rungs:
        raise BudgetLoraError(
            f"--prune: no evaluation step before the last one (train.eval_every {every}, "
            f"train.max_steps {last}); evaluate more often or give prune.rungs"
        )
    return rungs


def _options(request: SweepRequest, out: Path, worker: str) -> SweepOptions:
    return SweepOptions(
        out=out,
        storage_url=request.storage or default_storage(out),
        study_name=request.study_name,
        heartbeat=request.heartbeat,
        verbose=request.verbose,
        worker=worker,
        trust_pickle=request.trust_pickle,
        console=request.console,
        keep_going=request.keep_going,
    )


def _spawn_worker(request: SweepRequest, opts: SweepOptions, index: int, confirm_phase: bool) -> subprocess.Popen:
    """A child worker, started isolated from the working directory, given the request itself."""
    threads = request.threads or max(1, (os.cpu_count() or 1) // request.workers)
    child = dataclasses.replace(request, out=opts.out, storage=opts.storage_url, threads=threads)
    job = {"request": child.to_json(), "worker": f"w{index}", "confirm_phase": confirm_phase}
    return subprocess.Popen(python_call("budgetlora.sweeps.run:worker_main", json.dumps(job)))


def worker_main(argv: list[str]) -> int:
    """A child worker's entry point (`_spawn_worker`): argv[0] is the job as JSON."""

    def work_job() -> int:
        job = jsonfile.loads(argv[0], "the worker's job")
        run_worker(SweepRequest.from_json(job["request"]), str(job["worker"]), bool(job["confirm_phase"]))
        return 0

    return run_reporting_errors(work_job)


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _phase(
    request: SweepRequest, spec: StudySpec, opts: SweepOptions, planned: list[Planned], confirm_phase: bool = False
) -> WorkerStats:
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
        raise BudgetLoraError(
            f"{path}: not the list of points budgetlora wrote; the file is damaged "
            "(delete it to choose the confirmation points again)"
        ) from None
    return dataclasses.replace(
        spec,
        name=f"{spec.name}-confirm",
        points=points,
        search=[],
        sampler=None,
        seeds=None,
        n_trials=None,
        prune=None,
        objectives=["val_acc"],
    )


def _plan_confirmation(spec: StudySpec, opts: SweepOptions) -> Optional[StudySpec]:
    """The K best completed points by the first objective, each once per confirmation seed."""
    from optuna.trial import TrialState

    assert spec.confirm is not None
    study = open_optuna_study(spec, open_storage(opts.storage_url, None), opts.study_name)
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.COMPLETE and finite_values(t.values) is not None
    ]
    if not done:
        return None
    sign = -1 if spec.directions[0] == "maximize" else 1
    best, seen = [], set()
    for trial in sorted(done, key=lambda t: sign * t.values[0]):  # a point trained twice counts once
        if trial.user_attrs.get("point") not in seen and len(best) < spec.confirm.top:
            best.append(trial)
            seen.add(trial.user_attrs.get("point"))
    planned = {p.point.name: p for p in plan(spec)[0]}
    points = []
    for trial in best:
        name = trial.user_attrs["point"]
        if name in planned:
            base = planned[name].point.overrides
        elif isinstance(trial.user_attrs.get("overrides"), dict):
            base = trial.user_attrs["overrides"]
        else:
            raise BudgetLoraError(
                f"trial {trial.number} ({name}) has no stored search values to confirm (it was "
                "trained by an older budgetlora); rerun the search into a new --out"
            )
        for seed in spec.confirm.seeds:
            points.append(
                {
                    "name": f"{name}-seed{seed}",
                    "overrides": {**base, "train.seed": seed},
                    "axes": {"config": name, "seed": seed},
                }
            )
    atomic.write_json(opts.out / CONFIRM_DIR / CONFIRM_POINTS, points)
    return confirm_spec(spec, opts.out)


def run_sweep(request: SweepRequest) -> SweepOutcome:
    """Run (or resume, or join) a sweep; with workers > 1 the other workers are child processes."""
    spec = load_request(request)
    out = request.out if request.out is not None else Path("sweeps") / spec.name
    inside = rd.inside_run(out)
    if inside is not None:
        raise BudgetLoraError(f"--out {out} is inside the run {inside}; a sweep needs a folder of its own")
    report_files: tuple[str, ...] = ()
    if request.report:
        from budgetlora.results.report import REPORT_FILES as report_files
    atomic.OutputFolder(out, flag=None).claim(
        SWEEP_FILES + report_files
    )  # a user's own results.md is never written over
    if request.storage:
        open_storage(request.storage, request.heartbeat)  # a bad --storage fails before anything is written
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = atomic.file_in_the_way(out / "x")
        raise BudgetLoraError(
            f"--out {out}: "
            + (f"{blocker} is a file, not a folder" if blocker is not None else str(exc.strerror or exc))
        ) from None
    opts = _options(request, out, "w0" if request.workers > 1 else "")
    planned, skipped = plan(spec)
    if skipped:
        request.console.say(f"skipping {len(skipped)} point(s) over the budget:")
    for record in skipped:
        request.console.say(f"  {record['name']}: {record['reason']}")
    atomic.OutputFolder(out, overwrite=True).write_json(SKIPPED_FILE, skipped)
    what = (
        f"{len(planned)} point(s) to run, {len(skipped)} skipped"
        if spec.sampler is None
        else f"{spec.sampler} search, {spec.n_trials} trial(s)"
    )
    pruning = f"; pruning at steps {spec.prune.rungs} ({spec.prune.test})" if spec.prune else ""
    request.console.say(f"study {spec.name}: {what}{pruning}; out {out}")
    _set_threads(request.threads or (max(1, (os.cpu_count() or 1) // request.workers) if request.workers > 1 else None))
    stats = _phase(request, spec, opts, planned)
    confirmation = _plan_confirmation(spec, opts) if spec.confirm is not None else None
    if confirmation is not None:
        request.console.say(f"confirming the {spec.confirm.top} best with seeds {spec.confirm.seeds}")
        copts = dataclasses.replace(
            opts, out=out / CONFIRM_DIR, study_name=f"{request.study_name or spec.name}-confirm"
        )
        _phase(request, confirmation, copts, plan(confirmation)[0], confirm_phase=True)
    return SweepOutcome(out, stats, write_outputs(spec, opts, skipped, request.report, confirmation is not None))


def run_worker(request: SweepRequest, worker: str, confirm_phase: bool) -> WorkerStats:
    """A child of `--workers N`: work only; the parent plans the confirmation and writes the outputs."""
    spec = load_request(request)
    out = request.out if request.out is not None else Path("sweeps") / spec.name
    _set_threads(request.threads)
    opts = _options(request, out, worker)
    if confirm_phase:
        return work(
            confirm_spec(spec, out),
            dataclasses.replace(opts, out=out / CONFIRM_DIR, study_name=f"{request.study_name or spec.name}-confirm"),
        )
    return work_study(spec, opts, plan(spec)[0])
