"""Where a run lives and who may write it: the one place that creates, replaces, locks and reclaims
run directories (a run's own files are named in run_dir). Nothing here deletes what budgetlora did
not create: replacing needs the run's marker, and a symbolic link is never followed."""

from __future__ import annotations

import io
import itertools
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from budgetlora import atomic
from budgetlora.artifacts.run_dir import (
    ADAPTER,
    CHECKPOINTS,
    EXPORT_META,
    FULL_MODEL,
    LOCK,
    MARKER,
    TENSORBOARD,
    TOKENIZER,
    is_run_dir,
    read_mapping,
)
from budgetlora.config import RUN_NAME_PATTERN
from budgetlora.errors import BudgetLoraError, RunBusy, WriteError


def owned_run(path: Path) -> bool:
    """A run directory budgetlora created, by its marker: the only kind it ever replaces or deletes
    (a folder that merely looks like a run, a symbolic link, is never one)."""
    path = Path(path)
    marker = path / MARKER
    return path.is_dir() and not path.is_symlink() and marker.is_file() and not marker.is_symlink()


def check_replaceable(path: Path, what: str) -> None:
    """Refuse to replace or delete `path` unless it is an owned run (`what`: the action, for the message)."""
    path = Path(path)
    if owned_run(path):
        return
    if path.is_symlink():
        why = "is a symbolic link"
    elif is_run_dir(path):
        why = f"has no {MARKER} marker (not created by budgetlora 0.2 or later)"
    else:
        why = "is not a budgetlora run directory"
    raise BudgetLoraError(
        f"{path} {why}; budgetlora will not {what} it: move it away yourself, or choose another --name or --out"
    )


def check_inner_dirs(run_dir: Path) -> None:
    """A run's own folders are written in place: none may lead outside the run."""
    for name in (CHECKPOINTS, ADAPTER, TOKENIZER, FULL_MODEL, TENSORBOARD):
        if (Path(run_dir) / name).is_symlink():
            raise BudgetLoraError(
                f"{Path(run_dir) / name} is a symbolic link; budgetlora writes a run only inside "
                "its own directory: replace the link with the folder it points to"
            )


def read_marker(run_dir: Path) -> dict[str, Any]:
    return read_mapping(Path(run_dir) / MARKER, "the run marker is damaged")


# ----- who may write a run ------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory for one writer (train, resume, overwrite): a second
    writer fails at once, naming the process that holds it. The lock dies with its process."""

    def __init__(self, run_dir: Path, what: str):
        self.run_dir, self.what = Path(run_dir), what
        self._handle: Optional[io.TextIOWrapper] = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:  # never through a symbolic link: the holder's name is written into the file
            fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            handle = os.fdopen(fd, "r+", encoding="utf-8")
        except OSError as exc:
            if (self.run_dir / LOCK).is_symlink():
                raise BudgetLoraError(
                    f"{self.run_dir / LOCK} is a symbolic link; delete it (budgetlora makes its own lock file)"
                ) from None
            raise BudgetLoraError(f"cannot lock {self.run_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                handle.seek(0)
                holder = handle.read(200).strip() or "another process"
            except (OSError, UnicodeDecodeError):
                holder = "another process"
            finally:
                handle.close()
            raise RunBusy(
                f"{self.run_dir} is in use by {holder}; wait for it to finish (or stop it) before you {self.what}"
            ) from None
        except OSError as exc:  # no locks on this file system (some NFS setups)
            handle.close()
            raise BudgetLoraError(f"cannot lock {self.run_dir}: {exc.strerror or exc}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the flock
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----- where a run lives ---------------------------------------------------------------------


def _valid_run_name(name: str) -> bool:
    import re

    return bool(re.fullmatch(RUN_NAME_PATTERN, name)) and name not in (".", "..")


def check_run_name(name: str) -> None:
    if not _valid_run_name(name):
        raise BudgetLoraError(
            f"run name {name!r}: one path component of letters, digits, '.', '_', '-' "
            "(the run lives directly under --out)"
        )


@dataclass
class Placement:
    """Where a new run is written (`path`) and where it ends up (`final`): the same directory, or,
    when it replaces an earlier run (--overwrite), a hidden sibling swapped in once it finished."""

    path: Path
    final: Path
    locks: list[RunLock] = field(default_factory=list)

    @property
    def replaces(self) -> bool:
        return self.path != self.final

    def commit(self) -> None:
        """The run finished: a staged run takes the place of the one it replaces (checked again now:
        what stands there may have changed while the run trained)."""
        try:
            if self.replaces:
                if self.final.exists() or self.final.is_symlink():
                    try:
                        check_replaceable(self.final, "replace")
                    except BudgetLoraError as exc:
                        raise BudgetLoraError(f"{exc}; the finished run stays in {self.path}") from None
                try:
                    atomic.swap_into_place(self.path, self.final, replace=True)
                except OSError as exc:
                    raise WriteError(
                        f"cannot move the finished run {self.path} to {self.final}: "
                        f"{exc.strerror or exc}; it stays in {self.path}",
                        self.final,
                    ) from None
        finally:
            self.release()

    def abandon(self, resumable: bool = True) -> None:
        """The run failed: it is deleted unless a checkpoint makes it `resumable`."""
        if not resumable or not (self.path / CHECKPOINTS).is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks.clear()


def _new_run_dir(path: Path, replaces: Optional[str]) -> RunLock:
    path.mkdir(mode=0o777)  # raises FileExistsError: another process took the name first
    try:  # locked before the marker makes it replaceable: no other process may take it in between
        lock = RunLock(path, "train into it").acquire()
        try:
            atomic.write_json(path / MARKER, {"format": 1, "replaces": replaces})
        except BaseException:
            lock.release()
            raise
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return lock


def place_run(out_root: Path, name: str, overwrite: bool) -> Placement:
    """Create the directory of a new run under `out_root`: `name`, or `name-2`, ... so a rerun never
    clobbers an earlier result; with `overwrite`, a staged sibling that replaces the run `name`
    (only a budgetlora run, and only once the new one has finished)."""
    check_run_name(name)
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        final = out_root / name
        if (out_root / EXPORT_META).is_file():
            raise BudgetLoraError(f"{out_root} is a budgetlora export; put runs in another --out")
        if overwrite and (final.exists() or final.is_symlink()):
            check_replaceable(final, "--overwrite")
            held = RunLock(final, "replace it").acquire()  # no resume or second overwrite meanwhile
            staging = out_root / f".{name}.new-{secrets.token_hex(4)}"
            try:
                return Placement(staging, final, [held, _new_run_dir(staging, name)])
            except BaseException:
                held.release()
                raise
        for candidate in (out_root / n for n in itertools.chain([name], (f"{name}-{i}" for i in itertools.count(2)))):
            if not candidate.exists():
                try:
                    return Placement(candidate, candidate, [_new_run_dir(candidate, None)])
                except FileExistsError:
                    pass  # taken between the check and the mkdir: try the next name
        raise AssertionError("unreachable")
    except OSError as exc:
        blocker = out_root if out_root.exists() and not out_root.is_dir() else atomic.file_in_the_way(out_root / name)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or exc
        raise BudgetLoraError(f"cannot create the run directory under {out_root}: {reason}") from None


def place_exact(path: Path) -> Placement:
    """A new run at exactly `path` (a sweep names its trials' directories itself)."""
    check_run_name(Path(path).name)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return Placement(Path(path), Path(path), [_new_run_dir(Path(path), None)])
    except FileExistsError:
        raise BudgetLoraError(f"{path} exists already; a new run needs a new directory") from None
    except OSError as exc:
        blocker = atomic.file_in_the_way(Path(path))
        reason = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or exc
        raise BudgetLoraError(f"cannot create the run directory {path}: {reason}") from None


def reclaim(run_dir: Path, what: str) -> Placement:
    """An existing run for a writer that continues it (resume): locked, and if it was staged to
    replace another run, swapped into that place when it finishes."""
    run_dir = Path(run_dir)
    placement = Placement(run_dir, run_dir, [RunLock(run_dir, what).acquire()])
    try:
        replaces = read_marker(run_dir).get("replaces")
        if isinstance(replaces, str) and not _valid_run_name(replaces):
            replaces = None  # a damaged marker never points outside the run's folder
        check_inner_dirs(run_dir)
        if isinstance(replaces, str) and replaces and run_dir.name.startswith(f".{replaces}.new-"):
            placement.final = run_dir.parent / replaces
            if placement.final.exists() or placement.final.is_symlink():
                check_replaceable(placement.final, "replace")
                placement.locks.append(RunLock(placement.final, "replace it").acquire())
    except BaseException:
        placement.release()
        raise
    return placement
