"""The run directory: every file name in it, where a run lives, who may write it, and the small
files (config, labels, summary, metrics, predictions) read and written through one place.
docs/run-directory.md describes the same schema for users. No torch here: tables and reports
read runs on machines that never trained anything.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from budgetlora import atomic
from budgetlora.config import RUN_NAME_PATTERN, Config, config_from_dict, config_yaml, flatten, read_yaml
from budgetlora.errors import BudgetLoraError

CONFIG = "config.yaml"
SUMMARY = "summary.json"  # written last: a run is finished when it exists
METRICS = "metrics.jsonl"
LABELS = "labels.json"
PREDICTIONS = "test_predictions.csv"
ADAPTER = "adapter"
FULL_MODEL = "model"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
MODEL_CARD = "README.md"
PRUNED = "pruned.json"  # a sweep's pruner stopped the run at a rung: step, reason (resumable)
RUNGS = "rungs.json"  # a sweep's rung evaluations: per step, the per-row validation outcomes
MARKER = ".budgetlora-run"  # identifies a budgetlora run (and, for a staged --overwrite, what it replaces)
LOCK = ".lock"
EXPORT_META = "budgetlora.json"  # what budgetlora needs to read an export back: config, labels, head
EXPORT_FORMAT = 1
# folders inside a run that never hold other runs
INNER_DIRS = frozenset({ADAPTER, FULL_MODEL, TOKENIZER, CHECKPOINTS, TENSORBOARD, "__pycache__"})


def is_run_dir(path: Path) -> bool:
    """A directory budgetlora created for a run (finished or not)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    return (path / CONFIG).is_file() and any((path / f).exists() for f in (SUMMARY, LABELS, CHECKPOINTS, ADAPTER))


def is_finished(path: Path) -> bool:
    return (Path(path) / SUMMARY).is_file()


def inside_run(path: Path) -> Optional[Path]:
    """The run directory that `path` is or lies inside, if any."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if is_run_dir(candidate):
            return candidate
    return None


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BudgetLoraError(f"{path} is missing; {what}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BudgetLoraError(f"{path}: unreadable ({type(exc).__name__}); {what}") from None


def read_marker(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MARKER
    if not path.is_file():
        return {}
    data = _read_json(path, "the run marker is damaged")
    return data if isinstance(data, dict) else {}


# ----- who may write a run ------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run directory for one writer (train, resume, overwrite): a second
    writer fails at once, naming the process that holds it. The lock dies with its process."""

    def __init__(self, run_dir: Path, what: str):
        self.run_dir, self.what = Path(run_dir), what
        self._handle: Optional[io.TextIOWrapper] = None

    def acquire(self) -> "RunLock":
        import fcntl

        handle = open(self.run_dir / LOCK, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise BudgetLoraError(f"{self.run_dir} is in use by {holder}; wait for it to finish (or stop it) "
                                  f"before you {self.what}") from None
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

def check_run_name(name: str) -> None:
    import re

    if not re.fullmatch(RUN_NAME_PATTERN, name) or name in (".", ".."):
        raise BudgetLoraError(f"run name {name!r}: one path component of letters, digits, '.', '_', '-' "
                              "(the run lives directly under --out)")


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
        """The run finished: a staged run takes the place of the one it replaces."""
        if self.replaces:
            atomic.swap_into_place(self.path, self.final, replace=True)
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
    atomic.write_json(path / MARKER, {"format": 1, "replaces": replaces})
    return RunLock(path, "train into it").acquire()


def place_run(out_root: Path, name: str, overwrite: bool) -> Placement:
    """Create the directory of a new run under `out_root`: `name`, or `name-2`, ... so a rerun never
    clobbers an earlier result; with `overwrite`, a staged sibling that replaces the run `name`
    (only a budgetlora run, and only once the new one has finished)."""
    check_run_name(name)
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        final = out_root / name
        if overwrite and final.exists():
            if not final.is_dir() or not is_run_dir(final):
                raise BudgetLoraError(f"{final} exists and is not a budgetlora run; --overwrite replaces only "
                                      "runs: choose another --name or --out")
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
        raise BudgetLoraError(f"cannot create the run directory under {out_root}: {exc.strerror or exc}") from None


def place_exact(path: Path) -> Placement:
    """A new run at exactly `path` (a sweep names its trials' directories itself)."""
    check_run_name(Path(path).name)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return Placement(Path(path), Path(path), [_new_run_dir(Path(path), None)])
    except FileExistsError:
        raise BudgetLoraError(f"{path} exists already; a new run needs a new directory") from None
    except OSError as exc:
        raise BudgetLoraError(f"cannot create the run directory {path}: {exc.strerror or exc}") from None


def reclaim(run_dir: Path, what: str) -> Placement:
    """An existing run for a writer that continues it (resume): locked, and if it was staged to
    replace another run, swapped into that place when it finishes."""
    run_dir = Path(run_dir)
    locks = [RunLock(run_dir, what).acquire()]
    replaces = read_marker(run_dir).get("replaces")
    if isinstance(replaces, str) and replaces and run_dir.name.startswith(f".{replaces}.new-"):
        final = run_dir.parent / replaces
        if final.exists():
            try:
                locks.append(RunLock(final, "replace it").acquire())
            except BudgetLoraError:
                locks[0].release()
                raise
        return Placement(run_dir, final, locks)
    return Placement(run_dir, run_dir, locks)


# ----- the small files -------------------------------------------------------------------------

def write_config(cfg: Config, run_dir: Path) -> None:
    atomic.write_text(Path(run_dir) / CONFIG, config_yaml(cfg))


def read_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise BudgetLoraError(f"{run_dir} is not a budgetlora run directory (no {CONFIG})")
    try:
        return config_from_dict(read_yaml(path))
    except BudgetLoraError as exc:
        raise BudgetLoraError(f"{path}: {exc}") from None


def config_differences(run_dir: Path, cfg: Config, ignore: Sequence[str] = ()) -> list[str]:
    """The dotted keys in which the run's saved config differs from `cfg`."""
    stored = flatten(read_run_config(run_dir).to_dict())
    wanted = flatten(cfg.to_dict())
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k) and k not in ignore)


def write_labels(run_dir: Path, names: Sequence[str]) -> None:
    atomic.write_json(Path(run_dir) / LABELS, {"names": list(names)})


def read_labels(run_dir: Path) -> list[str]:
    data = _read_json(Path(run_dir) / LABELS, "the run did not finish or its labels file is damaged")
    names = data.get("names") if isinstance(data, dict) else None
    if (not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)):
        raise BudgetLoraError(f"{Path(run_dir) / LABELS}: expected {{\"names\": [two or more distinct class names]}}")
    return names


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic.write_json(Path(run_dir) / SUMMARY, summary)


def read_summary(run_dir: Path) -> dict[str, Any]:
    data = _read_json(Path(run_dir) / SUMMARY, "the run did not finish")
    if not isinstance(data, dict):
        raise BudgetLoraError(f"{Path(run_dir) / SUMMARY} does not hold a JSON object")
    return data


def write_pruned(run_dir: Path, record: dict[str, Any]) -> None:
    atomic.write_json(Path(run_dir) / PRUNED, record)


def read_pruned(run_dir: Path) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / PRUNED
    if not path.is_file() or is_finished(run_dir):
        return None
    data = _read_json(path, "the pruning record is damaged")
    return data if isinstance(data, dict) else None


def write_rung(run_dir: Path, step: int, record: dict[str, Any]) -> None:
    rungs = read_rungs(run_dir)
    rungs[str(step)] = record
    atomic.write_json(Path(run_dir) / RUNGS, rungs)


def read_rungs(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUNGS
    if not path.is_file():
        return {}
    data = _read_json(path, "the rung records are damaged")
    return data if isinstance(data, dict) else {}


class MetricsFile:
    """The metrics sink every run has: one JSON object per line, flushed so a crash loses nothing."""

    def __init__(self, run_dir: Path):
        self._handle = open(Path(run_dir) / METRICS, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts; unparsable lines (a run killed mid-write) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (and a line torn by a kill), so a resumed run appends
    to a log without duplicates."""
    if Path(path).is_file():
        kept = [json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step]
        atomic.write_text(Path(path), "".join(kept))


def csv_text(header: Sequence[str], rows: Iterator[Sequence[Any]]) -> str:
    """CSV by the csv module: a field with a comma, quote or newline is quoted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_test_predictions(run_dir: Path, ids: Sequence[str], labels: Sequence[int], preds: Sequence[int]) -> None:
    """`ID,label,pred` per test row: the per-row outcomes that paired significance tests need."""
    rows = ((i, int(l), int(p)) for i, l, p in zip(ids, labels, preds))
    atomic.write_text(Path(run_dir) / PREDICTIONS, csv_text(["ID", "label", "pred"], rows))


def write_predictions_csv(path: Path, ids: Sequence[str], preds: Sequence[int], names: Optional[Sequence[str]]) -> None:
    """`ID,Label` rows; Label is the class index, or the class name when `names` is given."""
    rows = ((row_id, names[int(p)] if names else int(p)) for row_id, p in zip(ids, preds))
    atomic.write_text(Path(path), csv_text(["ID", "Label"], rows))


# ----- exports (a merged Transformers model or an ONNX model, with what budgetlora reads back) -----

def read_export_meta(path: Path) -> dict[str, Any]:
    file = Path(path) / EXPORT_META
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BudgetLoraError(f"{file}: unreadable export description ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or meta.get("kind") not in ("merged", "onnx"):
        raise BudgetLoraError(f"{file}: not a budgetlora export description (format {EXPORT_FORMAT})")
    return meta


def export_config(meta: dict[str, Any], where: Path) -> Config:
    try:
        return config_from_dict(meta["config"])
    except (KeyError, TypeError, BudgetLoraError) as exc:
        raise BudgetLoraError(f"{where / EXPORT_META}: the saved config is not valid ({exc})") from None


def labels_of(meta: dict[str, Any], where: Path) -> list[str]:
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise BudgetLoraError(f"{where / EXPORT_META}: label_names must list two or more distinct class names")
    return names
