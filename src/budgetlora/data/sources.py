"""Readers that turn a data file (or a hub dataset) into raw rows of text columns + label.

Each reader yields `Row`s carrying the 1-based line (or record) number, so every later check can
name the exact place in the file that is wrong.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from budgetlora.errors import BudgetLoraError

csv.field_size_limit(16 * 1024 * 1024)  # a long article is legal; the tokenizer truncates it
# a bound on what one data file may hold in memory; larger corpora belong in several files or the hub
MAX_DATA_BYTES = int(os.environ.get("BUDGETLORA_MAX_DATA_BYTES", 4 << 30))

FORMATS = ("agnews", "csv", "tsv", "jsonl", "parquet", "pickle")
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".pkl": "pickle",
    ".pickle": "pickle",
}


AGNEWS_FIELDS = 3  # the original AG News CSV: class 1-4, title, description


def brief(value: Any, limit: int = 60) -> str:
    """A value from the data as an error message shows it: its repr (so newlines and control
    characters stay on one line), cut to `limit` characters so one hostile field cannot flood it."""
    if isinstance(value, int) and abs(value) >= 10**limit:  # repr() refuses ints past 4300 digits
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief_name(name: Any, limit: int = 60) -> str:
    """A column or class name for a message: plain when it is a short printable string, else `brief`."""
    if isinstance(name, str) and name and name.isprintable() and len(name) <= limit:
        return name
    return brief(name, limit)


def brief_names(names: Any, shown: int = 10) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(brief_name(n) for n in names[:shown]) + more


@dataclass
class Row:
    where: str  # "file line N" / "file record N", for error messages
    fields: dict[str, Any]


def clean_text(text: str) -> str:
    """Undo AG News' source artefacts: `\\$` escapes, backslash line breaks, `#39;` entities, tags."""
    text = text.replace("\\$", "$").replace("\\n", " ").replace("\\", " ")
    text = re.sub(r"(?<!&)#(\d{2,4});", r"&#\1;", text)
    text = html.unescape(text)
    text = re.sub(r"<[^>]{1,40}>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def check_data_file(path: Path) -> Path:
    """A regular file of bounded size: never a device, FIFO or directory that reads forever."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BudgetLoraError(f"data file not found: {path}") from None
    except OSError as exc:
        raise BudgetLoraError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise BudgetLoraError(f"{path} is a directory, expected a data file")
    if not stat.S_ISREG(info.st_mode):
        raise BudgetLoraError(f"{path} is not a regular file (a device, pipe or socket); give a data file")
    if info.st_size == 0:  # also what /proc and /sys files report, some of which block on read
        raise BudgetLoraError(f"{path}: the file is empty (0 bytes); give a data file with rows")
    if info.st_size > MAX_DATA_BYTES:
        raise BudgetLoraError(
            f"{path}: {info.st_size / 2**30:.1f} GiB is more than one data file may hold "
            f"({MAX_DATA_BYTES / 2**30:.0f} GiB); split it or raise BUDGETLORA_MAX_DATA_BYTES"
        )
    return path


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BudgetLoraError(
            f"{path}: cannot tell the format from the suffix '{path.suffix}'; "
            f"set data.format to one of {', '.join(FORMATS)}"
        )
    if fmt == "csv" and _looks_like_agnews(path):
        return "agnews"
    return fmt


def _looks_like_agnews(path: Path) -> bool:
    """The original AG News CSV has no header: its first field is a class number 1-4."""
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16).decode("utf-8-sig", errors="replace")
        first = next(csv.reader(io.StringIO(head, newline="")), None)
    except (OSError, csv.Error):
        return False
    return bool(first) and len(first) == AGNEWS_FIELDS and first[0].strip() in ("1", "2", "3", "4")


def _read_text(path: Path) -> str:
    check_data_file(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_DATA_BYTES + 1)  # bounded even if the file grows while read
    except OSError as exc:
        raise BudgetLoraError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_DATA_BYTES:
        raise BudgetLoraError(f"{path}: more than {MAX_DATA_BYTES / 2**30:.0f} GiB; split it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BudgetLoraError(
            f"{path} line {line}: not valid UTF-8 text (byte {exc.start}); re-save the file as UTF-8"
        ) from None


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    text = _read_text(path)
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise BudgetLoraError(f"{path} line {line}: contains a NUL byte; this is not a text table")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    try:
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as exc:
        runs_on = f"; the row runs on to line {reader.line_num}" if reader.line_num > start else ""
        raise BudgetLoraError(
            f"{path} line {start}: malformed row ({exc}){runs_on}; check for an unbalanced quote opened on that line"
        ) from None


def read_agnews(path: Path) -> list[Row]:
    rows = []
    for line, fields in _csv_rows(path, ","):
        if not fields:
            continue
        if len(fields) != AGNEWS_FIELDS:
            raise BudgetLoraError(
                f"{path} line {line}: expected 3 fields (class, title, description) "
                f"in the AG News format, got {len(fields)}"
            )
        klass = fields[0].strip()
        if klass not in ("1", "2", "3", "4"):
            raise BudgetLoraError(
                f"{path} line {line}: class {brief(fields[0])} is not 1-4 "
                "(the original AG News CSV numbers classes 1-4)"
            )
        rows.append(Row(f"{path} line {line}", {"label": int(klass) - 1, "title": fields[1], "description": fields[2]}))
    return rows


def read_delimited(path: Path, delimiter: str) -> list[Row]:
    rows: list[Row] = []
    header: Optional[list[str]] = None
    for line, fields in _csv_rows(path, delimiter):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if header is None:
            header = [h.strip() for h in fields]
            if len(set(header)) != len(header):
                raise BudgetLoraError(
                    f"{path} line {line}: duplicate column names in the header ({brief_names(header)})"
                )
            continue
        if len(fields) != len(header):
            raise BudgetLoraError(
                f"{path} line {line}: expected {len(header)} fields like the header "
                f"({brief_names(header)}), got {len(fields)}"
            )
        rows.append(Row(f"{path} line {line}", dict(zip(header, fields, strict=False))))
    if header is None:
        raise BudgetLoraError(f"{path}: the file is empty (expected a header line and rows)")
    return rows


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    # JSON Lines ends a record at "\n" only; str.splitlines() would also split at U+2028, \x85 and
    # other separators that are legal inside a JSON string
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BudgetLoraError(f"{path} line {number}: invalid JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # a number of > 4300 digits; nesting too deep
            raise BudgetLoraError(f"{path} line {number}: unreadable JSON ({brief(str(exc), 80)})") from None
        if not isinstance(record, dict):
            raise BudgetLoraError(f"{path} line {number}: expected a JSON object per line")
        for key, value in record.items():
            if not all(_encodable(s) for s in (key, value) if isinstance(s, str)):
                raise BudgetLoraError(
                    f"{path} line {number}: field {brief(key.encode('utf-8', 'replace').decode())} "
                    "holds a lone surrogate (an unpaired \\uD800-\\uDFFF escape), which is not "
                    "text"
                )
        rows.append(Row(f"{path} line {number}", record))
    return rows


def read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    check_data_file(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for corrupt files
        raise BudgetLoraError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    try:
        records = table.to_pylist()
    except Exception:  # noqa: BLE001 - values decode lazily: invalid UTF-8 in a string column, a date out of range
        raise BudgetLoraError(_parquet_value_error(path, table)) from None
    return [Row(f"{path} record {i + 1}", record) for i, record in enumerate(records)]


def _parquet_value_error(path: Path, table: Any) -> str:
    """Name the first column whose name, or record and column whose value, cannot become Python."""
    for index in range(table.num_columns):
        try:
            _ = table.schema.field(index).name  # decoding the name is the check
        except UnicodeDecodeError:
            return (
                f"{path}: the name of column {index + 1} is not UTF-8 text; "
                "write the file again with readable column names"
            )
    for i in range(table.num_rows):
        for name, column in zip(table.column_names, table.columns, strict=False):
            try:
                column[i].as_py()
            except Exception as exc:  # noqa: BLE001 - finding the value that fails, whatever its error
                return (
                    f"{path} record {i + 1}: column {brief_name(name)} holds an unreadable value ({type(exc).__name__})"
                )
    return f"{path}: not a readable parquet file (values cannot be read)"


def read_pickle(path: Path, trust_pickle: bool) -> list[Row]:
    """A pickled HF Dataset (e.g. Kaggle's test_unlabelled.pkl). Unpickling runs code: opt-in only."""
    refuse_untrusted_pickle(path, trust_pickle)
    import pickle

    check_data_file(path)
    try:
        with path.open("rb") as handle:
            obj = pickle.load(handle)  # noqa: S301 - explicit user opt-in above
    except Exception as exc:  # noqa: BLE001 - unpickling can raise anything
        raise BudgetLoraError(f"{path}: cannot unpickle ({type(exc).__name__}: {brief(str(exc), 80)})") from None
    if hasattr(obj, "features") and hasattr(obj, "to_list"):  # HF Dataset
        records = obj.to_list()
    elif hasattr(obj, "columns") and hasattr(obj, "to_dict"):  # pandas DataFrame
        records = obj.to_dict("records")
    elif isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        keys = list(obj)
        records = [dict(zip(keys, values, strict=False)) for values in zip(*obj.values(), strict=False)]
    elif isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        records = obj
    else:
        raise BudgetLoraError(
            f"{path}: unpickled a {type(obj).__name__}; expected a Dataset, "
            "DataFrame, dict of columns or list of records"
        )
    return [Row(f"{path} record {i + 1}", dict(r)) for i, r in enumerate(records)]


def refuse_untrusted_pickle(path: Path, trust_pickle: bool) -> None:
    if not trust_pickle:
        raise BudgetLoraError(
            f"{path} is read as a pickle (its suffix, or data.format: pickle); loading it can run arbitrary code. If you trust its "
            "source, pass --trust-pickle (trust comes from the command line or the "
            "trust_pickle argument only, never from a config file)"
        )


def read_rows(path: Path, fmt: str, trust_pickle: bool = False) -> tuple[str, list[Row]]:
    """Read every row of a data file; returns (resolved format, rows)."""
    check_data_file(path)
    fmt = detect_format(path, fmt)
    if fmt == "agnews":
        return fmt, read_agnews(path)
    if fmt in ("csv", "tsv"):
        return fmt, read_delimited(path, "," if fmt == "csv" else "\t")
    if fmt == "jsonl":
        return fmt, read_jsonl(path)
    if fmt == "parquet":
        return fmt, read_parquet(path)
    return fmt, read_pickle(path, trust_pickle)


def read_hub(dataset: str, config: Optional[str], split: str) -> tuple[list[Row], Optional[list[str]]]:
    """A Hugging Face hub dataset split; returns rows and the label names its features declare."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise BudgetLoraError("loading hub datasets needs the 'datasets' package: pip install datasets") from None
    try:
        ds = load_dataset(dataset, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets/hub/fsspec error types
        raise BudgetLoraError(
            f"cannot load hub dataset '{dataset}' split '{split}' ({type(exc).__name__}); offline, "
            "download it elsewhere or point data.train_file / data.test_file at local files"
        ) from None
    names = None
    for feature in ds.features.values():
        if hasattr(feature, "names"):
            names = list(feature.names)
            break
    return [Row(f"{dataset}[{split}] record {i + 1}", r) for i, r in enumerate(ds)], names
