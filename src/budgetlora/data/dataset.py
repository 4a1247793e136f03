"""From raw rows to a labeled text set: join text columns, map labels, split for validation."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from budgetlora.config import DataConfig
from budgetlora.config.schema import MAX_CLASS_NAME, MIN_CLASSES
from budgetlora.data.sources import (
    Row,
    brief,
    brief_names,
    check_data_file,
    clean_text,
    detect_format,
    read_hub,
    read_rows,
    refuse_untrusted_pickle,
)
from budgetlora.data.labels import (
    check_multi_label_training,
    check_scored_targets,
    multi_label_matrix,
    regression_targets,
    wrong_task_hint,
)
from budgetlora.errors import BudgetLoraError
from budgetlora.task import MULTI, REGRESSION, SINGLE

ID_COLUMNS = ("ID", "id", "Id")
AGNEWS_NAMES = ("World", "Sports", "Business", "Sci/Tech")
# inferring class names 0..max from integer labels: a larger max is a data error, not a class count
MAX_INFERRED_CLASSES = 10_000
MAX_CLASSES_FILE_BYTES = 1 << 20
MAX_INDEX_DIGITS = 18  # int() of a 5000-digit string raises; no class index is that long
MAX_NUMBER_CHARS = 40


@dataclass
class TextSet:
    texts: list[str]
    # int64 class indices (single-label), float32 rows x classes 0/1 (multi-label) or rows x
    # targets (regression); None for unlabeled data
    labels: Optional[np.ndarray]
    ids: list[str] = field(default_factory=list)  # row ids for prediction files
    pairs: Optional[list[str]] = None  # the second text of each row (data.text_pair_columns)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> "TextSet":
        return TextSet(
            [self.texts[i] for i in index],
            None if self.labels is None else self.labels[index],
            [self.ids[i] for i in index],
            None if self.pairs is None else [self.pairs[i] for i in index],
        )


def read_classes_file(path: str) -> list[str]:
    """Class names, one per line, from a small UTF-8 text file."""
    file = Path(path)
    if not file.exists():
        raise BudgetLoraError(f"classes file not found: {file}")
    check_data_file(file)
    if file.stat().st_size > MAX_CLASSES_FILE_BYTES:
        raise BudgetLoraError(f"{file}: over 1 MiB; a classes file lists class names, one per line")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BudgetLoraError(
            f"{file}: not a UTF-8 text file; a classes file lists class names, one per line"
        ) from None
    except OSError as exc:
        raise BudgetLoraError(f"cannot read {file}: {exc.strerror or exc}") from None
    names = []
    for number, line in enumerate(text.splitlines(), start=1):
        name = unicodedata.normalize("NFC", line.strip())
        if not name:
            continue
        if len(name) > MAX_CLASS_NAME or not name.isprintable():
            raise BudgetLoraError(
                f"{file} line {number}: {brief(name)} is not a class name (printable text of "
                f"at most {MAX_CLASS_NAME} characters, one name per line)"
            )
        names.append(name)
    if len(names) < MIN_CLASSES or len(set(names)) != len(names):
        raise BudgetLoraError(
            f"{file}: expected two or more distinct class names, one per line (names that differ "
            "only in Unicode normalisation, NFC, are the same name)"
        )
    if len(names) > MAX_INFERRED_CLASSES:
        raise BudgetLoraError(f"{file}: {len(names):,} lines; more than {MAX_INFERRED_CLASSES:,} classes")
    return names


def _text_of(row: Row, columns: Sequence[str], clean: bool, pair_side: bool = False) -> str:
    parts = []
    for column in columns:
        if column not in row.fields:
            raise BudgetLoraError(
                f"{row.where}: no text column '{column}' (columns: {brief_names(row.fields)}); set data.text_columns"
            )
        value = row.fields[column]
        if value is not None and not isinstance(value, (str, int, float)):
            raise BudgetLoraError(f"{row.where}: column '{column}' holds a {type(value).__name__}, expected text")
        parts.append("" if value is None else str(value))
    text = " ".join(p.strip() for p in parts if p.strip())
    if clean:
        text = clean_text(text)
    if not text:
        side = " (one side of a text pair)" if len(columns) == 1 and pair_side else ""
        raise BudgetLoraError(f"{row.where}: empty text{side}; remove the row or fill in '{'/'.join(columns)}'")
    return text


def _raw_label(row: Row, column: str) -> Any:
    if column not in row.fields:
        raise BudgetLoraError(
            f"{row.where}: no label column '{column}' (columns: {brief_names(row.fields)}); set data.label_column"
        )
    value = row.fields[column]
    if isinstance(value, str):
        # one name, one class: `café` typed precomposed or with a combining accent prints the same
        value = unicodedata.normalize("NFC", value.strip())
        # \d and int() agree on what a digit is; isdigit() also accepts '²', which int() refuses
        if re.fullmatch(r"-?\d+", value):
            if len(value) > MAX_INDEX_DIGITS:
                raise BudgetLoraError(f"{row.where}: label {brief(value)} is too large for a class index")
            return int(value)
        # a number with a point is read as JSONL reads it: 2.0 is class 2, 2.5 is no class
        if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", value) and len(value) <= MAX_NUMBER_CHARS:
            number = float(value)
            if number.is_integer() and abs(number) < 10**18:
                return int(number)
            raise BudgetLoraError(
                f"{row.where}: label {brief(value)} is not a class index or class name (a numeric target? "
                "set task: regression)"
            )
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or value == "" or isinstance(value, (bool, float)) or not isinstance(value, (int, str)):
        raise BudgetLoraError(f"{row.where}: label {brief(value)} is not a class index or class name")
    return value


def indices_mean_names(names: Sequence[str], explicit: bool) -> bool:
    """Whether an integer label may stand for names[i]: only when the order of the names is the
    user's (label_names, classes_file, AG News) or the names are the indices themselves. Names
    inferred from strings are sorted, so an integer in another file has no defined meaning."""
    return explicit or list(names) == [str(i) for i in range(len(names))] or tuple(names) == AGNEWS_NAMES


def map_labels(
    rows: list[Row], column: str, names: Optional[list[str]], indices_ok: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Class indices for `rows`. With known names, ints must be in range (and `indices_ok`) and
    strings must be names; without, names are inferred (ints 0..max, or the sorted distinct strings)."""
    raw = [_raw_label(row, column) for row in rows]
    if names is None:
        ints = [v for v in raw if isinstance(v, int)]
        if ints and len(ints) != len(raw):
            bad = next(i for i, v in enumerate(raw) if not isinstance(v, int))
            raise BudgetLoraError(f"{rows[bad].where}: label {brief(raw[bad])} mixes names with integer labels")
        if ints:
            if min(ints) < 0:
                bad = next(i for i, v in enumerate(raw) if v < 0)
                raise BudgetLoraError(f"{rows[bad].where}: negative label {brief(raw[bad])}")
            if max(ints) >= MAX_INFERRED_CLASSES:
                bad = next(i for i, v in enumerate(raw) if v >= MAX_INFERRED_CLASSES)
                raise BudgetLoraError(
                    f"{rows[bad].where}: label {brief(raw[bad])} is too large for a class index "
                    f"(over {MAX_INFERRED_CLASSES:,} classes); list the classes in "
                    "data.label_names or data.classes_file"
                )
            names = [str(i) for i in range(max(ints) + 1)]
        else:
            hint = wrong_task_hint(raw)
            if hint:
                raise BudgetLoraError(f"{rows[0].where if rows else column}: labels of a single-label task{hint}")
            names = sorted(set(raw))
        if len(names) < MIN_CLASSES:
            raise BudgetLoraError(
                f"{rows[0].where if rows else column}: only one class in the labels; a classifier needs at least two"
            )
    index = {name: i for i, name in enumerate(names)}
    labels = np.empty(len(raw), dtype=np.int64)
    for i, value in enumerate(raw):
        if isinstance(value, int):
            if not indices_ok:
                raise BudgetLoraError(
                    f"{rows[i].where}: integer label {value} where the classes are names "
                    f"({brief_names(names)}, sorted from the training labels); use the names, "
                    "or fix their order with data.label_names"
                )
            if not 0 <= value < len(names):
                hint = (
                    " (1-based labels? use 0..C-1, or data.format: agnews for the original AG News CSV)"
                    if value == len(names)
                    else ""
                )
                raise BudgetLoraError(f"{rows[i].where}: label {brief(value)} out of range 0..{len(names) - 1}{hint}")
            labels[i] = value
        elif value in index:
            labels[i] = index[value]
        else:
            raise BudgetLoraError(
                f"{rows[i].where}: unknown label {brief(value)}; known: {brief_names(names)}"
                + wrong_task_hint([value, *names])
            )
    return labels, names


def _ids(rows: list[Row]) -> list[str]:
    column = next((c for c in ID_COLUMNS if rows and c in rows[0].fields), None)
    if column is None:
        return [str(i) for i in range(len(rows))]
    ids, seen = [], {}
    for row in rows:
        value = str(row.fields.get(column, "")).strip()
        if not value:
            raise BudgetLoraError(f"{row.where}: empty {column}")
        if value in seen:
            raise BudgetLoraError(f"{row.where}: duplicate {column} {brief(value)} (first at {seen[value]})")
        seen[value] = row.where
        ids.append(value)
    return ids


def text_columns_for(fmt: str, cfg: DataConfig) -> list[str]:
    return ["title", "description"] if fmt == "agnews" else list(cfg.text_columns)


def check_trust(path: str, cfg: DataConfig, trust_pickle: bool) -> None:
    """Refuse an untrusted pickle before anything slow (a model load) happens."""
    if Path(path).is_file() and detect_format(Path(path), cfg.format) == "pickle":
        refuse_untrusted_pickle(Path(path), trust_pickle)


def _read_texts(rows: list[Row], columns: list[str], cfg: DataConfig) -> tuple[list[str], Optional[list[str]]]:
    if cfg.text_pair_columns:
        first, second = cfg.text_pair_columns
        texts = [_text_of(row, [first], cfg.clean_text, pair_side=True) for row in rows]
        return texts, [_text_of(row, [second], cfg.clean_text, pair_side=True) for row in rows]
    return [_text_of(row, columns, cfg.clean_text) for row in rows], None


def _has_labels(row: Row, cfg: DataConfig, fmt: str) -> bool:
    if fmt == "agnews":
        return True
    return all(c in row.fields for c in cfg.label_columns) if cfg.label_columns else cfg.label_column in row.fields


def read_labels(
    rows: list[Row], cfg: DataConfig, task: str, names: Optional[list[str]], indices_ok: bool, fmt: str = ""
) -> tuple[np.ndarray, list[str]]:
    """The labels of `rows` for `task` and the output names (inferred when `names` is None)."""
    if task == MULTI:
        return multi_label_matrix(rows, cfg, names, indices_ok)
    if task == REGRESSION:
        return regression_targets(rows, cfg)
    return map_labels(rows, "label" if fmt == "agnews" else cfg.label_column, names, indices_ok or fmt == "agnews")


def load_text_set(
    path: str,
    cfg: DataConfig,
    names: Optional[list[str]],
    labeled: bool,
    trust_pickle: bool = False,
    limit: Optional[int] = None,
    indices_ok: bool = True,
    task: str = SINGLE,
) -> tuple[TextSet, list[str]]:
    """Read one local file; returns the set and the label names (inferred if not given)."""
    fmt, rows = read_rows(Path(path), cfg.format, trust_pickle)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise BudgetLoraError(f"{path}: no data rows")
    if fmt == "agnews" and task != SINGLE:
        raise BudgetLoraError(f"{path}: the original AG News CSV has one class per row; use task: single_label")
    if fmt == "agnews" and names is None:
        names = list(AGNEWS_NAMES)
    texts, pairs = _read_texts(rows, text_columns_for(fmt, cfg), cfg)
    labels = None
    if labeled or _has_labels(rows[0], cfg, fmt):
        labels, names = read_labels(rows, cfg, task, names, indices_ok, fmt)
    return TextSet(texts, labels, _ids(rows), pairs), names or []


def _split_source(cfg: DataConfig, kind: str) -> str:
    file = cfg.val_file if kind == "validation" else cfg.test_file
    return file or f"the {kind} split"


def label_names_from_config(cfg: DataConfig) -> Optional[list[str]]:
    if cfg.label_names:
        return [unicodedata.normalize("NFC", n) for n in cfg.label_names]
    if cfg.classes_file:
        return read_classes_file(cfg.classes_file)
    return None


def _hub_set(
    cfg: DataConfig, split: str, names: Optional[list[str]], limit: Optional[int], task: str = SINGLE
) -> tuple[TextSet, list[str]]:
    rows, hub_names = read_hub(cfg.dataset, cfg.dataset_config, split)
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise BudgetLoraError(f"hub dataset '{cfg.dataset}' split '{split}' has no rows")
    names = names or (hub_names if task == SINGLE else None)
    texts, pairs = _read_texts(rows, list(cfg.text_columns), cfg)
    labels, names = read_labels(rows, cfg, task, names, True)
    return TextSet(texts, labels, [str(i) for i in range(len(rows))], pairs), names


ROWS_KEY_HEX = 16


def rows_key(rows: Optional[TextSet]) -> str:
    """Identifies a set of rows (ids and texts): per-row outcomes are compared only on the same rows."""
    import hashlib

    digest = hashlib.sha256()
    if rows is not None:
        pairs = rows.pairs if rows.pairs is not None else [None] * len(rows)
        for row_id, text, pair in zip(rows.ids, rows.texts, pairs, strict=False):
            digest.update(f"{row_id}\x00{text}\x00".encode("utf-8", "surrogatepass"))
            if pair is not None:
                digest.update(f"{pair}\x01".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:ROWS_KEY_HEX]


def stratified_split(
    labels: np.ndarray, size: float, seed, key: str = "data.val_size"
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping class proportions; `size` < 1 is a fraction, >= 1 a row count.
    Returns (kept indices, split-off indices)."""
    n = len(labels)
    n_out = int(round(size * n)) if size < 1 else int(size)
    if n_out <= 0:
        return np.arange(n), np.array([], dtype=np.int64)
    if n_out >= n:
        raise BudgetLoraError(f"config key '{key}': {size:g} leaves no training rows out of {n:,}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_out / n
    take = np.floor(exact).astype(int)
    # largest remainders get the rows that rounding down left over
    for i in np.argsort(-(exact - take))[: n_out - take.sum()]:
        take[i] += 1
    out = []
    for klass, k in zip(classes, take, strict=False):
        members = np.flatnonzero(labels == klass)
        out.append(rng.permutation(members)[:k])
    out_idx = np.sort(np.concatenate(out))
    keep_mask = np.ones(n, dtype=bool)
    keep_mask[out_idx] = False
    return np.flatnonzero(keep_mask), out_idx


def require_every_class(labels: np.ndarray, names: list[str], where: str) -> None:
    """A classifier cannot learn a class it never sees: every class needs training rows. This also
    catches a file whose only class is not 0 (inferred names 0..max) and a classes file that
    lists more classes than the data has."""
    counts = np.bincount(labels, minlength=len(names))
    if len(names) < MIN_CLASSES:
        raise BudgetLoraError(f"{where}: only one class in the labels; a classifier needs at least two")
    missing = [names[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        raise BudgetLoraError(
            f"{where}: {len(missing)} of {len(names)} classes have no training rows "
            f"({brief_names(missing)}); check data.label_names / data.classes_file, or "
            "use labels 0..C-1 with every class present"
        )


@dataclass
class Splits:
    train: TextSet
    val: Optional[TextSet]
    test: Optional[TextSet]
    label_names: list[str]
    task: str = SINGLE


def strata(labels: np.ndarray, task: str) -> np.ndarray:
    """What a split keeps the proportions of: the class (single-label); nothing otherwise."""
    return labels if task == SINGLE else np.zeros(len(labels), dtype=np.int64)


def check_training_labels(labels: np.ndarray, names: list[str], task: str, where: str) -> None:
    if task == SINGLE:
        require_every_class(labels, names, where)
    elif task == MULTI:
        check_multi_label_training(labels, names, where)
    elif len(labels) > 1 and (labels.std(0) == 0).any():
        constant = [names[i] for i in np.flatnonzero(labels.std(0) == 0)]
        raise BudgetLoraError(f"{where}: the regression target(s) {brief_names(constant)} never vary")


def load_splits(cfg: DataConfig, seed: int, trust_pickle: bool = False, task: str = SINGLE) -> Splits:
    """Train / validation / test sets with one consistent list of label names."""
    names = label_names_from_config(cfg)
    if cfg.train_file:
        train, names = load_text_set(cfg.train_file, cfg, names, True, trust_pickle, cfg.max_train_rows, task=task)
        source = cfg.train_file
    else:
        train, names = _hub_set(cfg, cfg.train_split, names, cfg.max_train_rows, task)
        source = f"hub dataset '{cfg.dataset}' split '{cfg.train_split}'"
    assert train.labels is not None
    check_training_labels(train.labels, names, task, source)
    explicit = cfg.label_names is not None or cfg.classes_file is not None
    indices_ok = indices_mean_names(names, explicit)

    def other_file(path: str, limit: Optional[int]) -> TextSet:
        return load_text_set(path, cfg, names, True, trust_pickle, limit, indices_ok, task)[0]

    test = None
    if cfg.test_file:
        test = other_file(cfg.test_file, cfg.max_test_rows)
    elif cfg.dataset and cfg.test_split:
        test, _ = _hub_set(cfg, cfg.test_split, names, cfg.max_test_rows, task)
    elif cfg.test_size:
        keep, test_idx = stratified_split(strata(train.labels, task), cfg.test_size, [seed, 7357], "data.test_size")
        train, test = train.subset(keep), train.subset(test_idx)
        if cfg.max_test_rows is not None:
            test = test.subset(np.arange(min(cfg.max_test_rows, len(test))))
    assert train.labels is not None
    if cfg.val_file:
        val: Optional[TextSet] = other_file(cfg.val_file, None)
    else:
        train_idx, val_idx = stratified_split(strata(train.labels, task), cfg.val_size, seed)
        val = train.subset(val_idx) if len(val_idx) else None
        train = train.subset(train_idx)
    assert train.labels is not None
    check_training_labels(train.labels, names, task, f"{source} after the validation/test splits")
    if task == REGRESSION:
        for part, kind in ((val, "validation"), (test, "test")):
            if part is not None and part.labels is not None:
                check_scored_targets(part.labels, names, _split_source(cfg, kind))
    return Splits(train, val, test, names, task)
