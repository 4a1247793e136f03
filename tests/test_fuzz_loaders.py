"""Hostile input: every generated file either loads into a consistent dataset or fails with one
BudgetLoraError line that names the file (and the line/record where there is one). Never another
exception, never a multi-line or unbounded message.

Each loader (AG News CSV, CSV, TSV, JSONL, parquet) gets >= 500 generated files: well-formed
tables with hostile field contents (quotes, delimiters, newlines, NUL, BOMs, empty texts, missing
columns, out-of-range / non-integer / huge labels, duplicate IDs, huge rows) written in several
encodings, then sometimes truncated, spliced with random bytes or replaced by random bytes.
The loaders run in-process; a few CLI subprocess cases check the exit code and the one-line error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetlora.config import DataConfig
from budgetlora.data.dataset import load_text_set
from budgetlora.errors import BudgetLoraError

pytestmark = pytest.mark.slow  # subprocesses and minutes of CPU: the full suite runs it

EXAMPLES = 500
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
MAX_MESSAGE = 1000  # one readable line, whatever the input holds

# ------------------------------------------------------------------------------------------------
# field contents

SPECIAL = [
    "",
    " ",
    "\n",
    "\r",
    "\r\n",
    '"',
    '""',
    "'",
    ",",
    "\t",
    "a,b",
    'say "hi"',
    "x\ty",
    "line\nbreak",
    "\ufeff",
    "\u2028",
    "\x85",
    "\x00",
    "\\",
    "\\n",
    "#39;",
    "&lt;b&gt;",
    "<p>",
    "NaN",
    "null",
    "1",
    "0",
    "é",
    "日本語",
    "🙂",
    "\x1b[31m",
]
LABEL_STRINGS = [
    "0",
    "1",
    "2",
    "3",
    "4",
    "7",
    "-1",
    " 2 ",
    "+1",
    "-0",
    "1.0",
    "2.5",
    "1e3",
    "nan",
    "inf",
    "",
    "a",
    "b",
    "c",
    "d",
    "World",
    "Sports",
    "²",
    "٣",
    "99999999999999999999",
    "0x1",
    "True",
]
COLUMN_NAMES = ["text", "label", "ID", "id", "title", "description", "", " text ", "Text", "label\n", 'te"xt']

small_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(SPECIAL),
    st.lists(st.sampled_from(SPECIAL + ["word", "topic", "x"]), max_size=6).map("".join),
)
words = st.lists(
    st.sampled_from(["match", "goal", "stocks", "market", "chip", "war", "the", "a"]), min_size=1, max_size=8
).map(" ".join)
field_text = st.one_of(words, words, small_text)
label_text = st.one_of(st.sampled_from(LABEL_STRINGS), st.integers(-3, 6).map(str), small_text)
id_text = st.one_of(st.integers(0, 6).map(str), small_text)  # small ints: duplicates are common


def huge_text(draw) -> str:
    return "word " * draw(st.integers(20_000, 60_000))


# legal but awkward: quotes, delimiters, line breaks, tabs, non-ASCII, HTML remnants inside real words
LEGAL_JOINS = [" ", ", ", '"', '""', "\n", "\r\n", "\t", "'", " é ", " 🙂 ", "\u2028", " &lt;b&gt; ", "\\", ";"]
legal_text = st.lists(st.tuples(words, st.sampled_from(LEGAL_JOINS)), min_size=1, max_size=4).map(
    lambda parts: "".join(w + j for w, j in parts) + "end"
)
CLEAN_NAMES = [None, None, ["a", "b", "c", "d"], ["0", "1"], ["World", "Sports", "Business", "Sci/Tech"]]


def clean_label(draw, names: Optional[list[str]]) -> str:
    if names is None:
        return str(draw(st.integers(0, 3)))
    return draw(st.one_of(st.sampled_from(names), st.integers(0, len(names) - 1).map(str)))


def clean_options(draw) -> tuple[Optional[list[str]], bool, bool]:
    """(names, labeled, with_ids) for a file that should load."""
    return draw(st.sampled_from(CLEAN_NAMES)), draw(st.booleans()), draw(st.booleans())


BAD_LABELS = ["7", "-1", "4", "2.5", "nan", "²", "9" * 30, "", "Cats", "1e3", "--1", "True"]
EMPTY_TEXTS = ["", "   ", "\t", "<p>", "&nbsp;", "\\", "<br/>"]


def one_defect(draw, records: list[dict], columns: list[str]) -> list[str]:
    """Break a loadable table in one place: a bad label, an empty text, a duplicate ID, a missing
    column or an extra key. Returns the (maybe shortened) column list."""
    kind = draw(st.sampled_from(["none", "none", "label", "text", "dup_id", "drop_column", "extra"]))
    row = records[draw(st.integers(0, len(records) - 1))]
    if kind == "label":
        row["label"] = draw(st.sampled_from(BAD_LABELS))
    elif kind == "text":
        row["text"] = draw(st.sampled_from(EMPTY_TEXTS))
    elif kind == "dup_id" and "ID" in columns and "ID" in records[0]:
        row["ID"] = records[0]["ID"]
    elif kind == "drop_column":
        columns = [c for c in columns if c != draw(st.sampled_from(["text", "label", "ID"]))]
    elif kind == "extra":
        row["surprise"] = "x"
    return columns


def rarely_mutate(draw, data: bytes) -> bytes:
    return mutate(draw, data) if draw(st.integers(0, 5)) == 0 else data


# ------------------------------------------------------------------------------------------------
# turning text into hostile bytes

ENCODINGS = ["utf-8", "utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]


def encode(draw, text: str) -> bytes:
    return text.encode(draw(st.sampled_from(ENCODINGS)), errors="replace")


def mutate(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "none", "none", "truncate", "splice", "flip", "random"]))
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if kind == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    if kind == "random":
        return draw(st.binary(max_size=200))
    return data


def table_text(draw, header: Optional[list[str]], rows: list[list[str]], delimiter: str) -> str:
    if draw(st.integers(0, 5)) == 0:  # a naive writer: no quoting at all
        lines = ([delimiter.join(header)] if header is not None else []) + [delimiter.join(r) for r in rows]
        return draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    out = io.StringIO()
    writer = csv.writer(
        out,
        delimiter=delimiter,
        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])),
        lineterminator=draw(st.sampled_from(["\n", "\r\n"])),
    )
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def ragged(draw, row: list[str]) -> list[str]:
    """Usually the row as is; sometimes a field missing or one too many."""
    kind = draw(st.integers(0, 12))
    if kind == 0:
        return row[:-1]
    if kind == 1:
        return row + [draw(field_text)]
    return row


# ------------------------------------------------------------------------------------------------
# file strategies: (bytes, DataConfig, label names given, labeled)


def value_for(draw, column: str) -> str:
    if column.strip().lower() == "label":
        return draw(label_text)
    if column.strip().lower() == "id":
        return draw(id_text)
    return draw(field_text)


def options(draw) -> tuple[Optional[list[str]], bool]:
    names = draw(
        st.sampled_from([None, None, ["a", "b", "c", "d"], ["0", "1"], ["World", "Sports", "Business", "Sci/Tech"]])
    )
    return names, draw(st.booleans())  # labeled=False is the predict path


@st.composite
def delimited_files(draw, delimiter: str):
    if draw(st.integers(0, 2)) == 0:  # a file that should load
        names, labeled, with_ids = clean_options(draw)
        header = draw(
            st.permutations(
                ["text", "label"]
                + (["ID"] if with_ids else [])
                + draw(st.lists(st.sampled_from(["title", "extra", "note"]), unique=True, max_size=2))
            )
        )
        records = [
            {"text": draw(legal_text), "label": clean_label(draw, names), "ID": f"row-{i}"}
            for i in range(draw(st.integers(1, 10)))
        ]
        header = one_defect(draw, records, list(header))
        rows = [[r.get(c, "x") for c in header] for r in records]
        if "text" in header and draw(st.integers(0, 10)) == 0:
            rows[0][header.index("text")] = huge_text(draw)
        if "surprise" in records[-1]:  # one row with a field too many
            rows[-1].append("surprise")
        text = table_text(draw, header, rows, delimiter)
        data = text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig"])))
        return rarely_mutate(draw, data), DataConfig(format="csv" if delimiter == "," else "tsv"), names, labeled
    if draw(st.integers(0, 2)):
        header = ["text", "label"] + draw(st.lists(st.sampled_from(COLUMN_NAMES), max_size=2))
        header = draw(st.permutations(header))
    else:
        header = draw(st.lists(st.one_of(st.sampled_from(COLUMN_NAMES), small_text), max_size=4))
    rows = [ragged(draw, [value_for(draw, c) for c in header]) for _ in range(draw(st.integers(0, 10)))]
    if rows and rows[0] and draw(st.integers(0, 15)) == 0:
        rows[0][0] = huge_text(draw)
    text = table_text(draw, header if draw(st.integers(0, 8)) else None, rows, delimiter)
    names, labeled = options(draw)
    return mutate(draw, encode(draw, text)), DataConfig(format="csv" if delimiter == "," else "tsv"), names, labeled


@st.composite
def agnews_files(draw):
    if draw(st.integers(0, 2)) == 0:  # a file that should load
        rows = [
            [draw(st.sampled_from(["1", "2", "3", "4"])), draw(legal_text), draw(legal_text)]
            for _ in range(draw(st.integers(1, 10)))
        ]
        defect = draw(st.integers(0, 5))
        if defect == 0:
            rows[-1][0] = draw(st.sampled_from(["0", "5", "x", " 2 ", ""]))
        elif defect == 1:
            rows[-1][1:] = [draw(st.sampled_from(EMPTY_TEXTS)), draw(st.sampled_from(EMPTY_TEXTS))]
        if draw(st.integers(0, 10)) == 0:
            rows[0][2] = huge_text(draw)
        names = draw(st.sampled_from([None, ["World", "Sports", "Business", "Sci/Tech"]]))
        data = table_text(draw, None, rows, ",").encode(draw(st.sampled_from(["utf-8", "utf-8-sig"])))
        return rarely_mutate(draw, data), DataConfig(format="agnews"), names, True
    klass = st.one_of(
        st.sampled_from(["1", "2", "3", "4"]),
        st.sampled_from(["1", "2", "3", "4"]),
        st.sampled_from(["0", "5", " 3", "x", "", "1.0", "Class Index"]),
        small_text,
    )
    rows = [ragged(draw, [draw(klass), draw(field_text), draw(field_text)]) for _ in range(draw(st.integers(0, 10)))]
    if rows and rows[0] and draw(st.integers(0, 15)) == 0:
        rows[0][-1] = huge_text(draw)
    names = draw(st.sampled_from([None, None, ["World", "Sports", "Business", "Sci/Tech"], ["a", "b"]]))
    return mutate(draw, encode(draw, table_text(draw, None, rows, ","))), DataConfig(format="agnews"), names, True


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    small_text,
    st.sampled_from([10**30, -(10**30), 2**63, 1e300, -1e300, 1.0, 2.0, 3.5]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6,
)
json_label = st.one_of(st.integers(-2, 6), st.integers(-2, 6), st.sampled_from(LABEL_STRINGS), json_value)


@st.composite
def jsonl_files(draw):
    if draw(st.integers(0, 2)) == 0:  # a file that should load
        names, labeled, with_ids = clean_options(draw)
        lines = []
        records = []
        for i in range(draw(st.integers(1, 10))):
            label = clean_label(draw, names)
            record = {
                "text": draw(legal_text),
                "label": int(label) if label.isdigit() and draw(st.booleans()) else label,
            }
            if with_ids:
                record["ID"] = draw(st.sampled_from([i, f"id-{i}"]))
            if draw(st.booleans()):
                record["extra"] = draw(json_value)
            records.append(record)
        keys = one_defect(draw, records, ["text", "label", "ID", "extra", "surprise"])
        if draw(st.integers(0, 6)) == 0:  # a JSON-typed bad label
            records[-1]["label"] = draw(json_value)
        for record in records:
            record = {k: v for k, v in record.items() if k in keys}
            lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())))
            if draw(st.integers(0, 5)) == 0:
                lines.append(draw(st.sampled_from(["", "  ", "\r"])))
        if draw(st.integers(0, 10)) == 0:
            lines.append(json.dumps({"text": huge_text(draw), "label": clean_label(draw, names)}))
        text = draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))
        return rarely_mutate(draw, text.encode("utf-8")), DataConfig(format="jsonl"), names, labeled
    lines = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.integers(0, 12))
        if kind == 0:
            lines.append(draw(small_text))  # not JSON (or accidentally JSON that is not an object)
        elif kind == 1:
            lines.append(json.dumps(draw(json_value)))
        elif kind == 2:
            lines.append(draw(st.sampled_from(["", "   ", "{}", "[]", "{", '{"text": "a"', "null"])))
        else:
            record = {}
            for key in draw(st.lists(st.sampled_from(["text", "label", "ID", "title", "extra"]), max_size=5)):
                record[key] = (
                    draw(json_label)
                    if key == "label"
                    else draw(st.one_of(field_text, field_text, json_value, st.integers(0, 5)))
                )
            if "text" in record and draw(st.integers(0, 25)) == 0:
                record["text"] = huge_text(draw)
            lines.append(json.dumps(record, ensure_ascii=draw(st.booleans())))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    names, labeled = options(draw)
    return mutate(draw, encode(draw, text)), DataConfig(format="jsonl"), names, labeled


def parquet_column(draw, column: str, n: int):
    import pyarrow as pa

    kind = draw(
        st.sampled_from(
            [
                "string",
                "string",
                "int",
                "large_string",
                "float",
                "bool",
                "binary",
                "list",
                "struct",
                "null",
                "uint64",
                "dict",
                "timestamp",
            ]
        )
    )

    def nullable(s):
        return st.one_of(st.none(), s, s, s)

    if column in ("label", "ID") and kind in ("string", "large_string"):
        values = [draw(nullable(label_text if column == "label" else id_text)) for _ in range(n)]
    elif kind in ("string", "large_string", "dict"):
        values = [draw(nullable(field_text)) for _ in range(n)]
        if n and draw(st.integers(0, 25)) == 0:
            values[0] = huge_text(draw)
    elif kind == "int":
        values = [draw(nullable(st.integers(-3, 6) | st.integers(-(2**63), 2**63 - 1))) for _ in range(n)]
    elif kind == "uint64":
        values = [draw(nullable(st.integers(0, 2**64 - 1))) for _ in range(n)]
    elif kind == "float":
        values = [draw(nullable(st.floats() | st.sampled_from([0.0, 1.0, 2.0, 3.0, 1e300]))) for _ in range(n)]
    elif kind == "bool":
        values = [draw(nullable(st.booleans())) for _ in range(n)]
    elif kind == "binary":
        values = [draw(nullable(st.binary(max_size=10))) for _ in range(n)]
    elif kind == "list":
        values = [draw(nullable(st.lists(st.integers(0, 3), max_size=3))) for _ in range(n)]
    elif kind == "struct":
        values = [draw(nullable(st.fixed_dictionaries({"a": st.integers(0, 3)}))) for _ in range(n)]
    elif kind == "timestamp":
        values = [draw(nullable(st.integers(0, 2**31))) for _ in range(n)]
    else:
        values = [None] * n
    types = {
        "string": pa.string(),
        "large_string": pa.large_string(),
        "int": pa.int64(),
        "uint64": pa.uint64(),
        "float": pa.float64(),
        "bool": pa.bool_(),
        "binary": pa.binary(),
        "list": pa.list_(pa.int64()),
        "struct": pa.struct([("a", pa.int64())]),
        "null": pa.null(),
        "timestamp": pa.timestamp("s"),
        "dict": pa.string(),
    }
    array = pa.array(values, type=types[kind])
    return array.dictionary_encode() if kind == "dict" else array


@st.composite
def parquet_files(draw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if draw(st.integers(0, 2)) == 0:  # a file that should load
        names, labeled, with_ids = clean_options(draw)
        n = draw(st.integers(1, 10))
        labels = [clean_label(draw, names) for _ in range(n)]
        columns = {
            "text": pa.array(
                [draw(legal_text) for _ in range(n)], type=draw(st.sampled_from([pa.string(), pa.large_string()]))
            ),
            "label": pa.array([int(v) for v in labels])
            if all(v.isdigit() for v in labels) and draw(st.booleans())
            else pa.array(labels),
        }
        if with_ids:
            columns["ID"] = pa.array(list(range(n)) if draw(st.integers(0, 4)) else [0] * n)  # dup IDs
        defect = draw(st.integers(0, 5))
        if defect == 0:
            columns.pop(draw(st.sampled_from(sorted(columns))))
        elif defect == 1:
            columns["label"] = pa.array([draw(st.sampled_from(BAD_LABELS)) for _ in range(n)])
        elif defect == 2:
            columns["text"] = pa.array([draw(st.sampled_from(EMPTY_TEXTS + ["ok text"])) for _ in range(n)])
        elif defect == 3:
            columns["label"] = parquet_column(draw, "label", n)
        if draw(st.booleans()):
            columns["extra"] = parquet_column(draw, "extra", n)
        out = io.BytesIO()
        pq.write_table(pa.table(columns), out)
        return rarely_mutate(draw, out.getvalue()), DataConfig(format="parquet"), names, labeled
    columns = (["text", "label"] if draw(st.integers(0, 2)) else []) + draw(
        st.lists(st.one_of(st.sampled_from(COLUMN_NAMES), small_text), max_size=3)
    )
    n = draw(st.integers(0, 10))
    table = (
        pa.Table.from_arrays([parquet_column(draw, c, n) for c in columns], names=columns) if columns else pa.table({})
    )
    out = io.BytesIO()
    pq.write_table(table, out)
    names, labeled = options(draw)
    return mutate(draw, out.getvalue()), DataConfig(format="parquet"), names, labeled


# ------------------------------------------------------------------------------------------------
# the property


def load_or_clean_error(path: Path, data: bytes, cfg: DataConfig, names: Optional[list[str]], labeled: bool) -> str:
    path.write_bytes(data)
    try:
        texts, got_names = load_text_set(str(path), cfg, names, labeled)
    except BudgetLoraError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message, message[:500]
        assert len(message) <= MAX_MESSAGE, message[:500]
        # the file is named, then where in it (line / record) or a colon for a whole-file problem
        assert re.search(re.escape(str(path)) + r"( line \d+| record \d+)?:", message), message[:500]
        return "error"
    assert len(texts) > 0 and len(texts.ids) == len(texts) == len(set(texts.ids))
    assert all(isinstance(t, str) and t.strip() for t in texts.texts)
    if names is not None:
        assert got_names == names
    if texts.labels is not None:
        assert texts.labels.dtype == np.int64 and len(texts.labels) == len(texts)
        assert len(got_names) >= 2 and ((0 <= texts.labels) & (texts.labels < len(got_names))).all()
    return "loaded"


def run_fuzz(strategy, suffix: str) -> None:
    outcomes = {"loaded": 0, "error": 0}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz input{suffix}"

        @FUZZ_SETTINGS
        @given(strategy)
        def check(case):
            data, cfg, names, labeled = case
            outcomes[load_or_clean_error(path, data, cfg, names, labeled)] += 1

        check()
    assert sum(outcomes.values()) >= EXAMPLES
    # the generator must reach both outcomes, or it tests only one path
    assert outcomes["loaded"] >= EXAMPLES // 20 and outcomes["error"] >= EXAMPLES // 20, outcomes


def test_fuzz_agnews_csv():
    run_fuzz(agnews_files(), ".csv")


def test_fuzz_csv():
    run_fuzz(delimited_files(","), ".csv")


def test_fuzz_tsv():
    run_fuzz(delimited_files("\t"), ".tsv")


def test_fuzz_jsonl():
    run_fuzz(jsonl_files(), ".jsonl")


def test_fuzz_parquet():
    run_fuzz(parquet_files(), ".parquet")


# ------------------------------------------------------------------------------------------------
# regressions the fuzzing found, kept as plain examples


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "huge.jsonl",
            '{"text": "a", "label": 100000000000000000000}\n{"text": "b", "label": 0}\n',
            r"huge.jsonl line 1: label 100000000000000000000 is too large for a class index",
        ),
        ("digits.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n", r"digits.jsonl line 1: unreadable JSON"),
        ("deep.jsonl", '{"text": ' + "[" * 100000 + "]" * 100000 + "}\n", r"deep.jsonl line 1: "),
        ("digits.csv", "text,label\na," + "9" * 5000 + "\n", r"digits.csv line 2: label '9999.* is too large"),
        ("minus.csv", "text,label\na,--1\nb,0\n", r"minus.csv line 2: label '--1' mixes names"),
        (
            "float.jsonl",
            '{"text": "a", "label": 1e300}\n{"text": "b", "label": 0}\n',
            r"float.jsonl line 1: label .* too large",
        ),
        ("sep.jsonl", '{"text": "a\u2028b", "label": 0}\n{"text": "c", "label": 1}\n', None),
        ("sup.csv", "text,label\na,\u00b2\nb,0\n", r"sup.csv line 2: (label|unknown label)"),
        ("utf8.parquet", None, r"utf8.parquet record 1: column text holds an unreadable value \(UnicodeDecodeError\)"),
        ("nl.csv", '"te\nxt",label\na,0\n', r"nl.csv line 3: no text column 'text' \(columns: 'te\\nxt', label\)"),
        ("name.parquet", None, r"name.parquet: the name of column 2 is not UTF-8 text"),
    ],
)
def test_fuzz_regressions(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "utf8.parquet":  # a byte flipped inside a string value of an uncompressed column
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(pa.table({"text": ["hello wörld", "abc"], "label": [0, 1]}), out, compression="none")
        data = out.getvalue()
        at = data.index("wörld".encode()) + 1
        path.write_bytes(data[:at] + b"\xf4" + data[at + 1 :])
    elif name == "name.parquet":  # a column name that is not UTF-8 (the footer stores it as bytes)
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(
            pa.table({"text": ["a", "b"], "lab\u00e9l": [0, 1]}), out, compression="none", store_schema=False
        )
        path.write_bytes(out.getvalue().replace("lab\u00e9l".encode(), b"lab\x89\x89l"))
    else:
        path.write_text(content, encoding="utf-8")
    if message is None:
        data, _ = load_text_set(str(path), DataConfig(), None, True)
        assert data.texts[0] == "a\u2028b" or data.texts[0] == "a b"
    else:
        with pytest.raises(BudgetLoraError, match=message):
            load_text_set(str(path), DataConfig(), None, True)


# ------------------------------------------------------------------------------------------------
# pickle and YAML: code never runs without an explicit opt-in


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_refused_without_opt_in_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(BudgetLoraError, match=r"evil.pkl is read as a pickle .*--trust-pickle"):
        load_text_set(str(path), DataConfig(), ["a", "b"], False)
    with pytest.raises(BudgetLoraError, match=r"evil.pkl is read as a pickle"):
        load_text_set(str(path), DataConfig(format="auto"), None, True)
    assert not marker.exists()
    # with the opt-in it is unpickled (and what it holds is then checked like any data)
    with pytest.raises(BudgetLoraError, match=r"evil.pkl: unpickled a NoneType"):
        load_text_set(str(path), DataConfig(), ["a", "b"], False, trust_pickle=True)
    assert marker.exists()


def test_config_yaml_is_safe_loaded(tmp_path):
    from budgetlora.config import load_config

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    with pytest.raises(BudgetLoraError, match=r"evil.yaml line 1: invalid YAML"):
        load_config(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# the CLI: exit 2, one line, nothing half-written


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, synthetic_data, tmp_path_factory) -> Path:
    import torch

    from budgetlora.config import config_from_dict
    from budgetlora.recipe import train_run

    cfg = config_from_dict(
        {
            "name": "fuzz",
            "model": str(tiny_model_dir),
            "budget": 1_000_000,
            "data": {"train_file": str(synthetic_data["train"]), "val_size": 0, "max_length": 32},
            "lora": {"r": 2, "targets": ["q"]},
            "train": {"max_steps": 2, "batch_size": 8, "eval_every": None, "device": "cpu", "precision": "fp32"},
        }
    )
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(tmp_path_factory.mktemp("fuzz-cache")))
        run = train_run(cfg, tmp_path_factory.mktemp("fuzz-runs"), verbose=False)
    torch.set_num_threads(threads)
    return run


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", BUDGETLORA_CACHE=str(cwd / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "budgetlora", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budgetlora: error: "), stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_train_on_hostile_csv_exits_2_and_writes_no_run_dir(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text('text,label\ngood match,0\n"stocks up,1\n', encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{train_file: {data}}}\ntrain: {{device: cpu}}\n")
    proc = cli("train", str(config), "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"{data} line 3: malformed row")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_predict_duplicate_ids_exits_2_and_writes_no_predictions(finished_run, tmp_path):
    data = tmp_path / "dups.csv"
    data.write_text("ID,text\n7,good match\n8,stocks up\n7,chip news\n", encoding="utf-8")
    out = tmp_path / "preds.csv"
    proc = cli("predict", str(finished_run), "--data", str(data), "--out", str(out), "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"{data} line 4: duplicate ID '7'")
    assert not out.exists() and not list(tmp_path.glob(".preds.csv*"))


@pytest.mark.parametrize(
    "name, content",
    [
        ("random.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
        ("latin1.csv", "text,label\ncaf\u00e9,0\n".encode("latin-1")),
        ("utf16.tsv", "text\tlabel\na\t0\n".encode("utf-16")),
        ("trunc.jsonl", b'{"text": "a", "label": 0}\n{"text": "b", "lab'),
        ("nonobj.jsonl", b"[1, 2]\n"),
        ("empty.csv", b""),
        ("range.csv", b"text,label\na,0\nb,9\n"),
        ("nolabel.parquet", b"PAR1garbagePAR1"),
    ],
)
def test_cli_eval_hostile_files_one_line_no_output(finished_run, tmp_path, capsys, name, content):
    from budgetlora.cli import main

    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "metrics.json"
    assert main(["eval", str(finished_run), "--data", str(data), "--json", str(out), "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(data))
    assert not out.exists()


def test_cli_predict_pickle_needs_trust_and_keeps_old_predictions(finished_run, tmp_path, capsys):
    from budgetlora.cli import main

    data = tmp_path / "test_unlabelled.pkl"
    data.write_bytes(pickle.dumps({"text": ["good match", "stocks up"]}))
    out = tmp_path / "preds.csv"
    out.write_text("old\n")
    assert main(["predict", str(finished_run), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, str(data), "--trust-pickle")
    assert out.read_text() == "old\n"
    assert (
        main(
            ["predict", str(finished_run), "--data", str(data), "--out", str(out), "--device", "cpu", "--trust-pickle"]
        )
        == 0
    )
    assert out.read_text().splitlines()[0] == "ID,Label" and len(out.read_text().splitlines()) == 3


def test_failed_prediction_write_leaves_no_partial_file(finished_run, tmp_path, capsys, monkeypatch):
    from budgetlora import atomic
    from budgetlora.cli import main

    data = tmp_path / "in.csv"
    data.write_text("ID,text\n1,good match\n2,stocks up\n", encoding="utf-8")
    out = tmp_path / "preds.csv"

    def full_disk(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    assert main(["predict", str(finished_run), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 2
    assert_one_error_line(capsys.readouterr().err, "No space left on device", str(out))
    assert not out.exists() and not list(tmp_path.glob(".preds.csv*"))


def test_failed_training_before_a_checkpoint_leaves_no_run_dir(tiny_model_dir, synthetic_data, tmp_path, monkeypatch):
    from budgetlora import recipe
    from budgetlora.config import config_from_dict

    def broken_loop(*args, **kwargs):
        raise BudgetLoraError("simulated failure inside training")

    monkeypatch.setattr(recipe, "train_loop", broken_loop)
    cfg = config_from_dict(
        {
            "name": "doomed",
            "model": str(tiny_model_dir),
            "data": {"train_file": str(synthetic_data["train"]), "max_length": 32},
            "train": {"max_steps": 2, "device": "cpu"},
        }
    )
    with pytest.raises(BudgetLoraError, match="simulated failure"):
        recipe.train_run(cfg, tmp_path / "runs", verbose=False)
    assert not (tmp_path / "runs" / "doomed").exists()
