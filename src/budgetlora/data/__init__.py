"""Data: read rows from files or the hub (sources), map labels and split (dataset), tokenize once
and batch by length (tokens)."""

from budgetlora.data.dataset import (
    AGNEWS_NAMES,
    Splits,
    TextSet,
    check_trust,
    label_names_from_config,
    load_splits,
    load_text_set,
)
from budgetlora.data.sources import clean_text, detect_format
from budgetlora.data.tokens import TokenizedSet, bucketed_batches, collate, sorted_batches, tokenize

__all__ = [
    "AGNEWS_NAMES",
    "Splits",
    "TextSet",
    "TokenizedSet",
    "bucketed_batches",
    "check_trust",
    "clean_text",
    "collate",
    "detect_format",
    "label_names_from_config",
    "load_splits",
    "load_text_set",
    "sorted_batches",
    "tokenize",
]
