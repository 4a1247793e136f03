"""The one way budgetlora writes files and directories: into a temp name beside the target,
fsynced, then renamed into place, with the permissions a plain `open()` / `mkdir` would give
under the user's umask. A reader never sees half a file; a failed write (disk full, no
permission) leaves the previous version intact and raises one `WriteError` naming the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from budgetlora.errors import WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def write_error(path: Path, exc: BaseException) -> WriteError:
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200] or type(exc).__name__
    return WriteError(f"cannot write {path}: {reason}", Path(path))


def _write_failure(exc: BaseException) -> bool:
    """An OSError, or safetensors' own error type, which is what a full disk raises inside it."""
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp file path beside `path` for the block to write; renamed to `path` when it succeeds."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
        tmp = None
        fsync_path(path.parent)
    except Exception as exc:
        if _write_failure(exc):
            raise write_error(path, exc) from None
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def write_with(path: Path, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` fills a temp file (a library's save function); it then becomes `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def write_json(path: Path, data: Any, indent: int = 2) -> Path:
    """JSON with no NaN or Infinity (they are not JSON): a non-finite number is a bug upstream."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def settle_tree(root: Path) -> None:
    """Modes from the umask (libraries such as safetensors create 0600 files) and every file and
    folder fsynced, before the tree is renamed into place."""
    fmode, dmode = file_mode(), dir_mode()
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            os.chmod(path, fmode)
            fsync_path(path)
        os.chmod(folder, dmode)
        fsync_path(Path(folder))


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = False) -> Iterator[Path]:
    """A temp directory beside `path` for the block to fill; it becomes `path` when the block
    succeeds. `path` must not exist unless `replace`, in which case the old directory is removed
    only after the new one is complete."""
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
        yield tmp
        settle_tree(tmp)
        swap_into_place(tmp, path, replace)
        tmp = None
    except Exception as exc:
        if _write_failure(exc):
            raise write_error(path, exc) from None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def swap_into_place(new: Path, path: Path, replace: bool) -> None:
    """Rename the finished directory `new` to `path`; an existing `path` (only with `replace`) is
    moved aside first and deleted last, so a failure in between leaves one of the two whole."""
    old: Path | None = None
    if path.exists() and replace:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
    try:
        os.rename(new, path)
    except OSError:
        if old is not None:
            os.rename(old, path)
        raise
    fsync_path(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
