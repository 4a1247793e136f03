"""Where a sweep's trials live: an Optuna study in a SQL database (SQLite `OUT/study.db` by
default, or any SQLAlchemy URL shared by machines) or a journal file (`journal:PATH`). Grid
points are enqueued as WAITING trials; a worker claims one by moving it to RUNNING, and the
storage lets only one worker win that move, so N processes pull from one queue. Heartbeats turn
the trials of killed workers back into WAITING ones."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from budgetlora.errors import BudgetLoraError, first_line
from budgetlora.stores import OPTUNA_TABLES, check_journal_store, check_sqlite_store
from budgetlora.sweeps.spec import StudySpec

JOURNAL_PREFIX = "journal:"
SQLITE_BUSY_S = 120  # how long a write waits for another worker's transaction
GRACE_FACTOR = 3  # a trial whose heartbeat is silent for this many intervals is taken for dead
MAX_RETRIES = 2  # a dead worker's trial is queued again at most this many times
HEARTBEAT_FAILURES_TO_WARN = 3
# what a damaged or foreign storage raises from inside Optuna (its records read back)
DAMAGED_STORAGE = (KeyError, ValueError, TypeError, AttributeError, IndexError)


def grace_period(interval: int, sqlite: bool) -> int:
    """Seconds of silence after which a trial is taken for dead: 3 intervals, and on SQLite at
    least the time a beat may wait for the write lock (SQLITE_BUSY_S) plus 10 s."""
    grace = GRACE_FACTOR * int(interval)
    return max(grace, SQLITE_BUSY_S + 10) if sqlite else grace


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    return Path(url[len("sqlite:///") :])


def _journal_path(url: str) -> Path | None:
    return Path(url[len(JOURNAL_PREFIX) :]).expanduser() if url.startswith(JOURNAL_PREFIX) else None


def lock_path(url: str) -> Path | None:
    # not "<file>.lock": Optuna's journal file lock takes that name for itself
    path = _sqlite_path(url) or _journal_path(url)
    return path.with_name(path.name + ".queue-lock") if path is not None else None


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive lock among processes on this machine (or a shared file system) using one
    storage file. Claiming is already safe in the storage; the lock also makes enqueueing what is
    missing and the n_trials count exact, so two workers starting together do not both enqueue."""
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rdb_storage(url: str, heartbeat: int | None) -> Any:
    """An Optuna RDBStorage; on SQLite every transaction takes the write lock up front.

    Optuna claims a WAITING trial by reading its state and then writing RUNNING. PostgreSQL and
    MySQL lock the row for that (SELECT ... FOR UPDATE); SQLite ignores FOR UPDATE and Python's
    sqlite3 starts the transaction only at the write, so two processes can both read WAITING and
    both "win" the trial. BEGIN IMMEDIATE makes the read and the write one serialized transaction."""
    import optuna

    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_S}} if path is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats and their retry callback are flagged experimental
        kwargs: dict[str, Any] = {}
        if heartbeat:
            # a beat can wait SQLITE_BUSY_S for the write lock: a live trial must not look dead meanwhile
            grace = grace_period(heartbeat, sqlite=path is not None)
            kwargs = {
                "heartbeat_interval": int(heartbeat),
                "grace_period": grace,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRIES
                ),
            }
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a bad URL or an unreachable server: SQLAlchemy's many types
            raise BudgetLoraError(
                f"--storage {url}: cannot open the Optuna storage ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]})"
            ) from None
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


def open_storage(url: str, heartbeat: int | None = 10) -> Any:
    """The study storage for `url`: `journal:PATH` (a journal file) or a SQLAlchemy URL."""
    journal = _journal_path(url)
    if journal is None:
        sqlite = _sqlite_path(url)
        if sqlite is not None:
            check_sqlite_store(sqlite, "Optuna storage", OPTUNA_TABLES, "--storage")
        with file_lock(lock_path(url)):
            return _rdb_storage(url, heartbeat)
    check_journal_store(journal, "--storage")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    journal.parent.mkdir(parents=True, exist_ok=True)
    try:  # the journal is replayed here: a damaged record surfaces as Optuna's KeyError, ValueError, ...
        return JournalStorage(JournalFileBackend(str(journal), lock_obj=JournalFileOpenLock(str(journal))))
    except DAMAGED_STORAGE as exc:
        raise BudgetLoraError(
            f"--storage {url}: the journal cannot be replayed ({type(exc).__name__}: "
            f"{first_line(exc, 120)}); it is damaged or not Optuna's"
        ) from None


def open_optuna_study(spec: StudySpec, storage: Any, study_name: str | None = None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler: optuna.samplers.BaseSampler
    if spec.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=spec.sampler_seed)
    name = study_name or spec.name
    pruner = spec.prune.optuna_pruner() if spec.prune is not None else None
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            directions=spec.directions,  # type: ignore[arg-type]
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except DAMAGED_STORAGE as exc:
        raise BudgetLoraError(
            f"the Optuna storage cannot be read ({type(exc).__name__}: {first_line(exc, 120)}); "
            "it is damaged or not Optuna's: use another --storage or --out"
        ) from None
    stored = [d.name.lower() for d in study.directions]
    if stored != spec.directions:
        raise BudgetLoraError(
            f"study '{name}' in the storage optimizes {stored}, the study file asks for "
            f"{spec.directions} ({', '.join(spec.objectives)}); use another --out, "
            "--storage or study name"
        )
    return study


def is_done_or_live(trial: Any, out: Optional[Path] = None) -> bool:
    """A trial that settles its point: waiting, running, complete, or pruned by the pruner. With
    `out` (the sweep folder), a settled trial whose run directories are gone settles nothing: its
    point is trained again rather than silently missing from the results."""
    from optuna.trial import TrialState

    settled = trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.PRUNED and "pruned_at" in trial.user_attrs
    )
    if settled and out is not None and isinstance(trial.user_attrs.get("run_dirs"), list):
        if not all((Path(out) / str(name)).is_dir() for name in trial.user_attrs["run_dirs"]):
            return False
    return settled or trial.state in (TrialState.WAITING, TrialState.RUNNING)


def enqueue_missing(study: Any, points: Sequence[Any], out: Optional[Path] = None) -> int:
    """Enqueue every point that has no waiting, running, completed or pruned trial (with its run
    directories still in `out`); returns how many. Points whose trials all failed are enqueued
    again: rerunning a sweep retries failures."""
    have = {t.user_attrs.get("point") for t in study.get_trials(deepcopy=False) if is_done_or_live(t, out)}
    added = 0
    for planned in points:
        if planned.point.name not in have:
            study.enqueue_trial(
                {},
                user_attrs={
                    "point": planned.point.name,
                    "axes": json.loads(json.dumps(planned.point.axes, default=str)),
                },
            )
            added += 1
    return added


class BaseHeartbeat:
    """A trial's heartbeat while it trains (Optuna's BaseHeartbeatThread / NullHeartbeatThread /
    HeartbeatThread split): `beat` once, or in a thread for the `with` block."""

    def beat(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "BaseHeartbeat":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class NullHeartbeat(BaseHeartbeat):
    """No heartbeat (--heartbeat 0): a killed worker's trial stays RUNNING until a rerun."""

    def beat(self) -> None:
        pass


class Heartbeat(BaseHeartbeat):
    """Records the trial's heartbeat while it trains, so a killed worker's trial goes stale. Optuna
    does this itself only inside Study.optimize; a sweep claims trials with ask/tell. A journal
    storage has no heartbeats of its own: the time goes into a trial attribute instead. A beat that
    fails (a busy or unreachable database) must not stop training; beats that keep failing are
    said once, since the trial will then be taken for dead and given to another worker."""

    def __init__(self, storage: Any, trial: Any, interval: int, warn: Any = None):
        self.storage, self.trial, self.interval = storage, trial, interval
        self.warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=2))
        self.failures, self.warned = 0, False

    def beat(self) -> None:
        if hasattr(self.storage, "record_heartbeat"):
            self.storage.record_heartbeat(self.trial._trial_id)
        else:
            self.storage.set_trial_user_attr(self.trial._trial_id, "heartbeat_at", time.time())

    def _beat_in_loop(self) -> None:
        try:
            self.beat()
            self.failures = 0
        except Exception as exc:  # noqa: BLE001 - the storage driver's own types (SQLAlchemy, OSError, ...)
            self.failures += 1
            if self.failures >= HEARTBEAT_FAILURES_TO_WARN and not self.warned:
                self.warned = True
                self.warn(
                    f"trial {self.trial.number}: {self.failures} heartbeats in a row failed "
                    f"({type(exc).__name__}: {first_line(exc, 120)}); if this goes on, another worker will "
                    "take the trial for dead and train it again"
                )

    def __enter__(self) -> "Heartbeat":
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self._beat_in_loop()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def heartbeat_for(storage: Any, trial: Any, interval: Optional[int], warn: Any = None) -> BaseHeartbeat:
    return Heartbeat(storage, trial, interval, warn) if interval else NullHeartbeat()


def fail_stale(study: Any, storage: Any, interval: int | None) -> None:
    """Trials whose worker died: failed, and their point queued again (at most twice)."""
    import optuna
    from optuna.trial import TrialState

    if hasattr(storage, "record_heartbeat"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        return
    if not interval:
        return
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get("heartbeat_at")
        if isinstance(beat, (int, float)) and now - beat > grace_period(interval, sqlite=False):
            if _fail(storage, trial):
                retries = int(trial.user_attrs.get("retries", 0))
                if retries < MAX_RETRIES and "point" in trial.user_attrs:
                    study.enqueue_trial(
                        {},
                        user_attrs={
                            "point": trial.user_attrs["point"],
                            "axes": trial.user_attrs.get("axes", {}),
                            "retries": retries + 1,
                        },
                    )


def fail_running(study: Any, storage: Any) -> None:
    """Without heartbeats (a single worker), a RUNNING trial at start is one a killed worker left:
    failed, so its point is queued again."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _fail(storage, trial)


def _fail(storage: Any, trial: Any) -> bool:
    """Mark a RUNNING trial failed; False when its worker settled it in the meantime."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except UpdateFinishedTrialError:
        return False
