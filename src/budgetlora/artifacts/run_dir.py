"""The run directory: every file name in it, and the small files (config, labels, summary, metrics,
predictions) read and written through one place (placement.py: where a run lives, who may write it).
docs/run-directory.md describes the same schema for users. No torch here: tables and reports
read runs on machines that never trained anything.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

from budgetlora import atomic, jsonfile
from budgetlora.config import Config, config_from_dict, config_yaml, flatten, read_yaml
from budgetlora.config.schema import MIN_CLASSES
from budgetlora.artifacts.summary import PrunedRecord, RunSummary
from budgetlora.errors import BudgetLoraError
from budgetlora.task import SINGLE, Decisions, LabelSpace, check_decisions_fit

CONFIG = "config.yaml"
SUMMARY = "summary.json"  # written last: a run is finished when it exists
PREVIOUS_SUMMARY = "summary.previous.json"  # the summary of a finished run while --extend trains it further
METRICS = "metrics.jsonl"
LABELS = "labels.json"
DECISIONS = "decisions.json"  # the temperature / thresholds tuned on validation (task.Decisions)
PREDICTIONS = "test_predictions.csv"
VAL_PREDICTIONS = "val_predictions.csv"  # the final model on the validation rows: what choosing between runs pairs
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
MLFLOW_RUN_ID = ".mlflow-run-id"  # the MLflow run a resume continues
EXPORT_META = "budgetlora.json"  # what budgetlora needs to read an export back: config, labels, head
EXPORT_FORMAT = 1
# what a run's own files are called (another file may not be written over them)
RESERVED = frozenset(
    {
        CONFIG,
        VAL_PREDICTIONS,
        SUMMARY,
        PREVIOUS_SUMMARY,
        METRICS,
        LABELS,
        DECISIONS,
        PREDICTIONS,
        ADAPTER,
        FULL_MODEL,
        TOKENIZER,
        CHECKPOINTS,
        TENSORBOARD,
        MODEL_CARD,
        MARKER,
        LOCK,
        MLFLOW_RUN_ID,
    }
)
# folders inside a run that never hold other runs
INNER_DIRS = frozenset({ADAPTER, FULL_MODEL, TOKENIZER, CHECKPOINTS, TENSORBOARD, "__pycache__"})


def is_run_dir(path: Path) -> bool:
    """A directory budgetlora created for a run (finished or not)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    return (path / CONFIG).is_file() and any((path / f).exists() for f in (SUMMARY, LABELS, CHECKPOINTS, ADAPTER))


def check_output_file(path: Path, source: Optional[Path] = None) -> None:
    """A file the user asks for (predictions, metrics) may not replace a run's own file, nor the
    data it was computed from."""
    path = Path(path)
    if source is not None and path.exists() and Path(source).exists() and path.resolve() == Path(source).resolve():
        raise BudgetLoraError(f"--out {path} is the input data file; write the output to another file")
    for holder in (path.parent, *path.parent.resolve().parents):
        if (holder / EXPORT_META).is_file():
            raise BudgetLoraError(f"{path} would write into the export {holder}; write it to another path")
    run = inside_run(path.parent)
    if run is not None and (
        path.name in RESERVED | {PRUNED, RUNGS, EXPORT_META} or path.resolve().parent != run.resolve()
    ):
        raise BudgetLoraError(f"{path} would replace a file of the run {run}; write it to another path")


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
        return jsonfile.read(path)
    except FileNotFoundError:
        raise BudgetLoraError(f"{path} is missing; {what}") from None
    except OSError as exc:
        raise BudgetLoraError(f"{path}: unreadable ({type(exc).__name__}); {what}") from None
    except BudgetLoraError as exc:
        raise BudgetLoraError(f"{exc}; {what}") from None


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
        if str(exc).startswith(str(path)):
            raise
        raise BudgetLoraError(f"{path}: {exc}") from None


def config_differences(run_dir: Path, cfg: Config, ignore: Sequence[str] = ()) -> list[str]:
    """The dotted keys in which the run's saved config differs from `cfg`."""
    stored = flatten(read_run_config(run_dir).to_dict())
    wanted = flatten(cfg.to_dict())
    return sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k) and k not in ignore)


def write_labels(run_dir: Path, space: LabelSpace) -> None:
    atomic.write_json(Path(run_dir) / LABELS, space.to_json())


def read_label_space(run_dir: Path) -> LabelSpace:
    """labels.json: the task, the output names and the regression targets' scaling."""
    path = Path(run_dir) / LABELS
    space = LabelSpace.from_json(_read_json(path, "the run did not finish or its labels file is damaged"), str(path))
    if space.task == SINGLE and not valid_names(list(space.names)):
        raise BudgetLoraError(f'{path}: expected {{"names": [two or more distinct class names]}}')
    return space


def write_decisions(run_dir: Path, decisions: Decisions) -> None:
    atomic.write_json(Path(run_dir) / DECISIONS, decisions.to_json())


def read_decisions(run_dir: Path, space: LabelSpace) -> Decisions:
    """decisions.json (a run of an earlier version has none: the default decisions)."""
    path = Path(run_dir) / DECISIONS
    if not path.exists():
        return Decisions.default(space)
    decisions = Decisions.from_json(_read_json(path, "the file is damaged"), str(path))
    check_decisions_fit(decisions, space, str(path))
    return decisions


def valid_names(names: Any) -> bool:
    return (
        isinstance(names, list)
        and len(names) >= MIN_CLASSES
        and all(isinstance(n, str) and n for n in names)
        and len(set(names)) == len(names)
    )


def read_labels(run_dir: Path) -> list[str]:
    return list(read_label_space(run_dir).names)


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    atomic.write_json(Path(run_dir) / SUMMARY, summary.to_json())


METRIC_NUMBERS = (
    "train_loss",
    "train_acc",
    "train_subset_acc",
    "eval_loss",
    "eval_acc",
    "eval_score",
    "lr",
    "samples_per_s",
    "epoch",
)
MAX_METRICS_BYTES = 32 * 2**20  # a log line per step for 150,000 steps; more is not a log budgetlora wrote


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def read_summary(run_dir: Path) -> RunSummary:
    path = Path(run_dir) / SUMMARY
    return RunSummary.from_json(_read_json(path, "the run did not finish"), str(path))


def write_pruned(run_dir: Path, record: PrunedRecord) -> None:
    atomic.write_json(Path(run_dir) / PRUNED, record.to_json())


def read_pruned(run_dir: Path) -> Optional[PrunedRecord]:
    path = Path(run_dir) / PRUNED
    if not path.is_file() or is_finished(run_dir):
        return None
    return PrunedRecord.from_json(_read_json(path, "the pruning record is damaged"), str(path))


def write_rung(run_dir: Path, step: int, record: dict[str, Any]) -> None:
    rungs = read_rungs(run_dir)
    rungs[str(step)] = record
    atomic.write_json(Path(run_dir) / RUNGS, rungs)


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A small JSON object file of the run; {} when it is absent or not an object."""
    if not Path(path).is_file():
        return {}
    data = _read_json(Path(path), what)
    return data if isinstance(data, dict) else {}


def read_rungs(run_dir: Path) -> dict[str, Any]:
    return read_mapping(Path(run_dir) / RUNGS, "the rung records are damaged")


def read_rung_from(run_dir: Path, step: int) -> Optional[dict[str, Any]]:
    """The run's first rung record at `step` or later (a run resumed past a rung records where it
    stands), or None."""
    rungs = read_rungs(run_dir)
    reached = sorted(int(k) for k, v in rungs.items() if str(k).isdigit() and int(k) >= step and isinstance(v, dict))
    return rungs[str(reached[0])] if reached else None


class MetricsFile:
    """The metrics sink every run has: one JSON object per line, flushed so a crash loses nothing."""

    def __init__(self, run_dir: Path):
        self._handle = open(Path(run_dir) / METRICS, "a", encoding="utf-8")

    def log_config(self, cfg: Config) -> None:
        pass  # config.yaml holds it

    def finish(self, run_dir: Path, summary: RunSummary) -> None:
        pass  # summary.json holds it

    def log(self, record: dict) -> None:
        # an overflowing evaluation (fp16) can give an infinite loss: null in the log, not a crash
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._handle.write(json.dumps(clean, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts; unparsable lines (a run killed mid-write) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in jsonfile.read_text_lenient(path, MAX_METRICS_BYTES).splitlines():
        try:
            record = jsonfile.loads(line, str(path))
        except BudgetLoraError:  # a line torn by a kill, or damaged: skipped
            continue
        if (
            isinstance(record, dict)
            and isinstance(record.get("step"), int)
            and all(_is_number(record.get(k)) for k in METRIC_NUMBERS)
        ):
            records.append(record)
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after `step` (and a line torn by a kill), so a resumed run appends
    to a log without duplicates."""
    if Path(path).is_file():
        kept = [json.dumps(r, allow_nan=False) + "\n" for r in read_metrics(path) if r["step"] <= step]
        atomic.write_text(Path(path), "".join(kept))


FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")  # what makes a spreadsheet read a cell as a formula


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab or carriage
    return first) gets a leading apostrophe, as OWASP's CSV-injection advice has it; numbers such
    as `-5` stay as they are. docs/run-directory.md documents it."""
    if not isinstance(value, str) or not value.startswith(FORMULA_LEADS):
        return value
    try:
        [float(part) for part in value.split(" ")]  # a number, or numbers joined by spaces (regression targets)
        return value
    except ValueError:
        return "'" + value


def csv_text(header: Sequence[str], rows: Iterator[Sequence[Any]]) -> str:
    """CSV by the csv module: a field with a comma, quote or newline is quoted; formula-leading
    text cells are neutralised (`spreadsheet_safe`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spreadsheet_safe(h) for h in header])
    writer.writerows([spreadsheet_safe(v) for v in row] for row in rows)
    return buffer.getvalue()


def write_test_predictions(
    run_dir: Path, ids: Sequence[str], labels: Sequence[Any], preds: Sequence[Any], name: str = PREDICTIONS
) -> None:
    """`ID,label,pred` per row of the test split (or, as `val_predictions.csv`, of the validation
    split): the per-row outcomes that paired significance tests need. Cells are class indices, or
    (evaluate.scoring.answer_cells) label indices / values joined by spaces."""
    rows = (
        (i, label if isinstance(label, str) else int(label), pred if isinstance(pred, str) else int(pred))
        for i, label, pred in zip(ids, labels, preds, strict=True)
    )
    atomic.write_text(Path(run_dir) / name, csv_text(["ID", "label", "pred"], rows))


def write_predictions_csv(path: Path, ids: Sequence[str], preds: Sequence[int], names: Optional[Sequence[str]]) -> None:
    """`ID,Label` rows; Label is the class index, or the class name when `names` is given."""
    rows = ((row_id, names[int(p)] if names else int(p)) for row_id, p in zip(ids, preds, strict=False))
    atomic.write_output(Path(path), csv_text(["ID", "Label"], rows))


def write_table_csv(path: Path, header: Sequence[str], rows: Iterator[Sequence[Any]]) -> None:
    """A predictions file of any shape (ID first), as `write_predictions_csv` writes it."""
    atomic.write_output(Path(path), csv_text(header, rows))


# ----- a run directory's state, in one answer ----------------------------------------------------


@dataclass(frozen=True)
class Absent:
    """Nothing at the path yet."""


@dataclass(frozen=True)
class Unfinished:
    """A run that started and did not finish; `resumable` when it has checkpoints and its config is
    the one asked for (`config_diff` lists the keys that differ, if a config was given)."""

    resumable: bool
    config_diff: tuple[str, ...] = ()


@dataclass(frozen=True)
class Paused:
    """A sweep's synchronous rung stopped the run at `step` (or later) with this validation accuracy."""

    step: int
    val_acc: float


@dataclass(frozen=True)
class Pruned:
    """A sweep's pruner stopped the run (resumable to full length when `resumable`)."""

    record: PrunedRecord
    resumable: bool


@dataclass(frozen=True)
class Finished:
    summary: RunSummary
    config_diff: tuple[str, ...] = ()


RunStatus = Union[Absent, Unfinished, Paused, Pruned, Finished]


def run_status(
    run_dir: Path, cfg: Optional[Config] = None, pause_at: Optional[int] = None, ignore: Sequence[str] = ()
) -> RunStatus:
    """What `run_dir` holds: absent, unfinished (resumable or not), paused at the rung `pause_at`,
    pruned, or finished (its summary). With `cfg`, the keys in which the run's config differs from
    it (besides `ignore`) come along. Refuses a symbolic link and a summary without its config."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink():
        raise BudgetLoraError(f"{run_dir} is a symbolic link; budgetlora writes runs only into real folders")
    if not run_dir.exists():
        return Absent()
    has_config = (run_dir / CONFIG).is_file()
    diff = tuple(config_differences(run_dir, cfg, ignore)) if cfg is not None and has_config else ()
    if is_finished(run_dir):
        if not has_config:
            raise BudgetLoraError(
                f"{run_dir} has a {SUMMARY} but no {CONFIG}: not a run budgetlora can reuse; move it away"
            )
        return Finished(read_summary(run_dir), diff)
    resumable = (run_dir / CHECKPOINTS).is_dir() and has_config and not diff
    pruned = read_pruned(run_dir)
    if pruned is not None:
        return Pruned(pruned, resumable)
    if pause_at is not None:
        record = read_rung_from(run_dir, pause_at)
        acc = record.get("acc") if record is not None else None
        if isinstance(acc, (int, float)) and not isinstance(acc, bool) and math.isfinite(acc):
            return Paused(int(record.get("step", pause_at)), float(acc))
    return Unfinished(resumable, diff)
