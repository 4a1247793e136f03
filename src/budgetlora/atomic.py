"""The one way budgetlora writes files and directories: into a temp name beside the target,
fsynced, then renamed into place, with the permissions a plain `open()` / `mkdir` would give
under the user's umask. A reader never sees half a file; a failed write (disk full, no
permission) leaves the previous version intact and raises one `WriteError` naming the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from budgetlora.errors import BudgetLoraError, WriteError, first_line

LEFTOVER_MARKERS = (".tmp-", ".old-", ".tmp")  # what a killed writer can leave beside its target


def _umask() -> int:
    """The process umask, read without changing it (setting and restoring it would briefly give any
    other thread's new files mode 0666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the only portable way to read it
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
    blocker = file_in_the_way(Path(path))
    if blocker is not None:  # mkdir says "File exists" (or "Not a directory"), which hides the cause
        return WriteError(f"cannot write {path}: {blocker} is a file, not a folder", Path(path))
    reason = getattr(exc, "strerror", None) or first_line(exc)
    return WriteError(f"cannot write {path}: {reason}", Path(path))


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a directory (so nothing can be made below it)."""
    for parent in Path(path).absolute().parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


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
    if path.exists() and not replace:
        raise WriteError(f"cannot write {path}: it exists already", path)
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


# ----- outputs a user names (predictions, metrics, reports): never renamed over what is not a file

MAX_LINK_HOPS = 40  # the kernel's own limit on a chain of symbolic links
_DESCRIPTOR_NAME = re.compile(r"^/(dev/(stdout|stderr|fd/\d+)|proc/(self|\d+)/fd/\d+)$")


def _names_a_descriptor(path: Path) -> bool:
    """Whether `path`, or a link on the way to its target, is a name for an open file descriptor
    (/dev/stdout, /dev/fd/N, /proc/self/fd/N): what it points at is this process's open file."""
    current, hops = os.path.abspath(path), 0
    while hops < MAX_LINK_HOPS:
        if _DESCRIPTOR_NAME.match(current):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.join(os.path.dirname(current), os.readlink(current))
        current, hops = os.path.abspath(current), hops + 1
    return False


def _through_special(path: Path) -> bool:
    """Whether `path` must be written through rather than replaced: a character device (/dev/null,
    a terminal), a FIFO, or a name for an open descriptor (/dev/stdout, /proc/self/fd/N), whatever
    it points at. A regular file anywhere else (/dev/shm included) is replaced atomically."""
    import stat

    mode = os.stat(path).st_mode
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or _names_a_descriptor(Path(path))


def output_target(path: Path) -> tuple[Path, bool]:
    """Where an output named `path` is written, and whether it is written through (see
    `_through_special`) instead of atomically replaced. A symbolic link to a regular file keeps
    being a link: its target is replaced. Directories, sockets, block devices and dangling links
    are refused."""
    import stat

    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise WriteError(
                f"cannot write {path}: it is a symbolic link to nothing ({os.readlink(path)})", path
            ) from None
        return path, False
    except OSError as exc:
        raise write_error(path, exc) from None
    if _through_special(path):
        return path, True
    if stat.S_ISREG(mode):
        return Path(os.path.realpath(path)) if path.is_symlink() else path, False
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    raise WriteError(f"cannot write {path}: it is {kind}; give a file path", path)


def write_output(path: Path, text: str) -> Path:
    """A user-named output file: written atomically, or through a device, FIFO or stdout name."""
    target, through = output_target(path)
    if not through:
        return write_text(target, text)
    import sys

    sys.stdout.flush()  # what was printed before comes first when the target is this process's stdout
    try:
        # append: a descriptor name (/dev/stdout) redirected to a file must not truncate that file
        with open(target, "a", encoding="utf-8", newline="") as handle:
            handle.write(text)
    except OSError as exc:
        raise write_error(Path(path), exc) from None
    return Path(path)


OUTPUTS_MANIFEST = ".budgetlora-outputs.json"  # name -> sha256 of the outputs budgetlora wrote into a folder


class OutputFolder:
    """A folder budgetlora writes named outputs into (results, reports, comparisons, a sweep's
    files). A file of the same name that budgetlora did not write there, or that changed since, is
    replaced only with `overwrite`, and never when it is not a regular file; `claim` checks every
    name before anything is written. What was written is recorded in OUTPUTS_MANIFEST."""

    def __init__(self, root: Path, overwrite: bool = False, flag: Optional[str] = "--overwrite"):
        self.root, self.overwrite, self.flag = Path(root), overwrite, flag

    def _manifest(self) -> dict[str, str]:
        from budgetlora import jsonfile

        path = self.root / OUTPUTS_MANIFEST
        try:
            data = jsonfile.read(path, max_bytes=2**20) if path.is_file() else {}
        except (OSError, BudgetLoraError):  # a damaged manifest vouches for nothing: existing files count as foreign
            data = {}
        return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}

    def _ours(self, path: Path, manifest: dict[str, str]) -> bool:
        import hashlib

        expected = manifest.get(path.name)
        return (
            expected is not None
            and path.is_file()
            and not path.is_symlink()
            and hashlib.sha256(path.read_bytes()).hexdigest() == expected
        )

    def claim(self, names: "list[str] | tuple[str, ...]") -> None:
        """Refuse (before anything is written) if any of `names` may not be written."""
        if self.root.exists() and not self.root.is_dir():
            raise BudgetLoraError(f"{self.root} is not a folder; give a folder for the outputs")
        manifest = self._manifest()
        for name in names:
            path = self.root / name
            if not (path.exists() or path.is_symlink()) or self._ours(path, manifest):
                continue
            if path.is_symlink() or not path.is_file():
                raise BudgetLoraError(
                    f"{path} exists and is not a regular file; budgetlora will not replace it "
                    "(move it away or write the outputs to another folder)"
                )
            if not self.overwrite:
                advice = f"pass {self.flag} to replace it, or write" if self.flag else "move it away, or write"
                raise BudgetLoraError(
                    f"{path} exists and budgetlora did not write it (or it changed since); "
                    f"{advice} the outputs to another folder"
                )

    def write_with(self, name: str, write: Callable[[Path], Any]) -> Path:
        import hashlib

        self.claim([name])
        path = write_with(self.root / name, write)
        manifest = self._manifest()
        manifest[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        write_json(self.root / OUTPUTS_MANIFEST, dict(sorted(manifest.items())))
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_with(name, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))

    def write_json(self, name: str, data: Any, indent: int = 2) -> Path:
        return self.write_text(name, json.dumps(data, indent=indent, allow_nan=False) + "\n")
