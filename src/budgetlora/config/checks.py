"""Checks that involve more than one config key (each key's own type and range are checked when
the config is built, config.load): names, adapters, lengths, data and task settings that do not
fit together, each refused with the key to change."""

from __future__ import annotations

import re
import unicodedata

from budgetlora.config.schema import (
    DEVICE_PATTERN,
    MAX_CLASS_NAME,
    MAX_TARGETS,
    MIN_CLASSES,
    RUN_NAME_PATTERN,
    TARGET_NAMES,
    Config,
)
from budgetlora.errors import BudgetLoraError


def _whole(value: float) -> bool:
    return value < 1 or float(value).is_integer()


def _need(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise BudgetLoraError(f"config key '{key}': {what}")


def check_values(cfg: Config) -> None:
    """Checks that involve more than one key (each key's own type and range are checked on load)."""
    _check_names(cfg)
    _check_adapters(cfg)
    _check_lengths(cfg)
    _check_data(cfg)
    _check_task(cfg)


def _check_names(cfg: Config) -> None:
    need, train = _need, cfg.train
    need(
        bool(re.fullmatch(RUN_NAME_PATTERN, cfg.name)),
        "name",
        f"{cfg.name!r} is not a run name: one path component of letters, digits, '.', '_', '-' "
        "(starting with a letter or digit, at most 100 characters)",
    )
    need(
        bool(re.fullmatch(DEVICE_PATTERN, train.device)),
        "train.device",
        f"{train.device!r}: expected auto, cpu, cuda, cuda:N or mps",
    )


def _check_adapters(cfg: Config) -> None:
    need, lora, data = _need, cfg.lora, cfg.data
    unknown = [t for t in lora.targets if t not in TARGET_NAMES]
    need(
        not unknown,
        "lora.targets",
        f"unknown target(s) {unknown}; valid: {', '.join(TARGET_NAMES)} (exact module paths go in lora.target_modules)",
    )
    need(
        cfg.mode == "full" or bool(lora.targets or lora.target_modules),
        "lora.targets",
        "must name at least one module (or set lora.target_modules)",
    )
    for key, values in (
        ("lora.targets", lora.targets),
        ("lora.target_modules", lora.target_modules),
        ("lora.layers", lora.layers or []),
        ("data.text_columns", data.text_columns),
    ):
        need(len(set(values)) == len(values), key, f"lists a value twice: {values}")
    need(all(m.strip() for m in lora.target_modules), "lora.target_modules", "holds an empty module path")
    need(
        lora.layers is None or len(lora.layers) > 0,
        "lora.layers",
        "is empty, which adapts no layer; leave it out (null) to adapt every layer",
    )
    need(
        not (lora.use_dora and lora.dropout_position == "lowrank"),
        "lora.dropout_position",
        "lowrank is not available with lora.use_dora (DoRA reuses the dropped input); use input or auto",
    )


def _check_lengths(cfg: Config) -> None:
    need, data, train = _need, cfg.data, cfg.train
    need(train.max_steps is not None or train.epochs is not None, "train.max_steps", "set max_steps or epochs")
    for key, value in (
        ("data.val_size", data.val_size),
        ("data.test_size", data.test_size),
        ("train.warmup", train.warmup),
    ):
        need(value is None or _whole(value), key, f"got {value}: a fraction (< 1) or a whole number of rows/steps")
    if train.max_steps is not None and train.warmup >= 1:
        need(
            train.warmup < train.max_steps,
            "train.warmup",
            f"{int(train.warmup)} warmup steps is not shorter than the {train.max_steps} steps of the run",
        )
    need(
        train.early_stopping_patience is None or (data.val_size > 0 and train.eval_every is not None),
        "train.early_stopping_patience",
        "needs evaluations: data.val_size > 0 and train.eval_every set",
    )


def _check_data(cfg: Config) -> None:
    need, data = _need, cfg.data
    need(
        data.dataset is not None or data.train_file is not None,
        "data.train_file",
        "set data.train_file (a local file) or data.dataset (a hub dataset id)",
    )
    need(not (data.dataset and data.train_file), "data.train_file", "set data.train_file or data.dataset, not both")
    need(
        not (data.label_names and data.classes_file),
        "data.classes_file",
        "set data.label_names or data.classes_file, not both",
    )
    if data.label_names is not None:
        names = data.label_names
        need(len(names) >= MIN_CLASSES, "data.label_names", "needs at least two class names")
        need(
            all(n.strip() and len(n) <= MAX_CLASS_NAME and n.isprintable() for n in names),
            "data.label_names",
            "class names must be non-empty printable strings of at most 200 characters",
        )
        need(
            len({unicodedata.normalize("NFC", n) for n in names}) == len(names),
            "data.label_names",
            f"lists a class twice (names that differ only in Unicode normalisation, NFC, are one name): {names}",
        )
    has_test = bool(data.test_file or (data.dataset and data.test_split))
    need(
        data.test_size is None or not has_test,
        "data.test_size",
        "splits a test set off the training rows; the config already has a test set "
        "(data.test_file, or data.test_split: null for a hub dataset)",
    )
    need(
        bool(data.text_columns) and all(c.strip() for c in data.text_columns),
        "data.text_columns",
        "must name at least one column",
    )


MAX_SEPARATOR = 3  # characters of data.label_separator
PAIR = 2  # the columns of a text pair


def _check_task(cfg: Config) -> None:
    """Keys that only make sense for some tasks, and the task's own label settings."""
    need, data, train, task = _need, cfg.data, cfg.train, cfg.task
    pair = data.text_pair_columns
    need(
        pair is None or (len(pair) == PAIR and len(set(pair)) == PAIR and all(c.strip() for c in pair)),
        "data.text_pair_columns",
        f"names the two columns of a text pair, [first, second]; got {pair}",
    )
    columns = data.label_columns
    need(
        len(set(columns)) == len(columns) and all(c.strip() for c in columns),
        "data.label_columns",
        f"lists a column twice or an empty name: {columns}",
    )
    need(
        task != "single_label" or not columns,
        "data.label_columns",
        "several label columns are multi-label (one 0/1 column per class: task: multi_label) or several "
        "regression targets (task: regression); a single-label task reads data.label_column",
    )
    need(
        task != "multi_label" or len(columns) != 1,
        "data.label_columns",
        "a multi-label task with 0/1 columns needs one column per class (two or more)",
    )
    need(len(columns) <= MAX_TARGETS, "data.label_columns", f"{len(columns):,} columns; at most {MAX_TARGETS:,}")
    sep = data.label_separator
    need(
        0 < len(sep) <= MAX_SEPARATOR
        and sep.isprintable()
        and not any(c.isalnum() for c in sep)
        and sep.strip() == sep,
        "data.label_separator",
        f"{sep!r}: 1-{MAX_SEPARATOR} printable characters, no letters or digits, no surrounding spaces (e.g. ',' or '|')",
    )
    need(
        not (task == "multi_label" and columns and (data.label_names or data.classes_file)),
        "data.label_columns",
        "the 0/1 columns name the classes; leave out data.label_names / data.classes_file",
    )
    need(
        task != "regression" or not (data.label_names or data.classes_file),
        "data.label_names",
        "a regression task has targets, not classes: name them with data.label_column / data.label_columns",
    )
    classification = task != "regression"
    need(
        classification or train.loss in ("auto", "mse", "huber"),
        "train.loss",
        f"{train.loss} is a classification loss; a regression task takes mse (auto) or huber",
    )
    need(
        not classification or train.loss in ("auto", "cross_entropy", "focal"),
        "train.loss",
        f"{train.loss} is a regression loss; a {task} task takes cross_entropy (auto) or focal",
    )
    need(
        classification or train.class_weights == "none",
        "train.class_weights",
        "weights classes; a regression task has none",
    )
    need(
        task == "single_label" or train.label_smoothing == 0,
        "train.label_smoothing",
        "smooths a softmax over classes: single-label only",
    )
    need(
        not (train.loss == "focal" and train.label_smoothing),
        "train.label_smoothing",
        "applies to the cross-entropy loss; with train.loss: focal leave it at 0",
    )
