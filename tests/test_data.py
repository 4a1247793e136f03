"""Loaders on good and bad files, label mapping, the stratified split, tokens and batches."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from budgetlora.config import DataConfig
from budgetlora.data.dataset import load_splits, load_text_set, stratified_split
from budgetlora.data.sources import clean_text
from budgetlora.data.tokens import bucketed_batches, collate, sorted_batches, tokenize, TokenizedSet
from budgetlora.errors import BudgetLoraError
from helpers import AG_NEWS


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_original_agnews_csv_is_detected_and_mapped():
    data, names = load_text_set(str(AG_NEWS / "test.csv"), cfg(), None, True)
    assert len(data) == 7600 and names == ["World", "Sports", "Business", "Sci/Tech"]
    assert np.bincount(data.labels).tolist() == [1900] * 4
    # row 1: class 3 (Business), title + description joined, HTML remnants undone
    assert data.labels[0] == 2 and data.texts[0].startswith("Fears for T N pension after talks Unions")
    assert not any("#39;" in t or "&lt;" in t or "\\" in t for t in data.texts)


def test_clean_text():
    assert (
        clean_text("A second\\team won \\$10 #36;5 it#39;s &lt;b&gt;big&lt;/b&gt;")
        == "A second team won $10 $5 it's big"
    )


def test_generic_csv_tsv_jsonl_parquet_agree(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("good match", "Sports"), ("stocks up, again", "Business"), ('quote "x" here', "Sports")]
    with (tmp_path / "d.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["title", "body", "topic"])
        writer.writerows((t, t.upper(), label) for t, label in rows)
    (tmp_path / "d.tsv").write_text(
        "title\tbody\ttopic\n" + "".join(f"{t}\t{t.upper()}\t{label}\n" for t, label in rows)
    )
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"title": t, "body": t.upper(), "topic": label}) + "\n" for t, label in rows)
    )
    pq.write_table(
        pa.table(
            {"title": [t for t, _ in rows], "body": [t.upper() for t, _ in rows], "topic": [label for _, label in rows]}
        ),
        tmp_path / "d.parquet",
    )
    c = cfg(text_columns=["title", "body"], label_column="topic")
    results = [load_text_set(str(tmp_path / f"d.{ext}"), c, None, True) for ext in ("csv", "tsv", "jsonl", "parquet")]
    for data, names in results:
        assert names == ["Business", "Sports"]
        assert data.labels.tolist() == [1, 0, 1]
        assert data.texts[2] == 'quote "x" here QUOTE "X" HERE'


@pytest.mark.parametrize(
    "content, message",
    [
        ('text,label\nhello,0\n"unclosed,1\n', r"bad.csv line 3: malformed row"),
        ("text,label\nhello,0\nworld,1,extra\n", r"bad.csv line 3: expected 2 fields"),
        ("text,label\nhello,0\n  ,1\n", r"bad.csv line 3: empty text"),
        ("text,label\nhello,0\nworld,7\n", r"bad.csv line 3: label 7 out of range 0..3"),
        ("text,label\nhello,World\nworld,Cats\n", r"bad.csv line 3: unknown label 'Cats'; known: World, Sports"),
        ("body,label\nhello,0\n", r"bad.csv line 2: no text column 'text' \(columns: body, label\)"),
        ("text,topic\nhello,0\n", r"bad.csv line 2: no label column 'label'"),
        ("", r"bad.csv: the file is empty"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(BudgetLoraError, match=message):
        load_text_set(str(path), cfg(), ["World", "Sports", "Business", "Sci/Tech"], True)


def test_bad_agnews_class_and_encoding(tmp_path):
    path = tmp_path / "ag.csv"
    path.write_text('"1","t","d"\n"5","t","d"\n')
    with pytest.raises(BudgetLoraError, match=r"ag.csv line 2: class '5' is not 1-4"):
        load_text_set(str(path), cfg(format="agnews"), None, True)
    path.write_bytes(b'"1","t","d"\n"2","\xff\xfe","d"\n')
    with pytest.raises(BudgetLoraError, match=r"ag.csv line 2: not valid UTF-8"):
        load_text_set(str(path), cfg(), None, True)


def test_missing_file_and_pickle_opt_in(tmp_path):
    with pytest.raises(BudgetLoraError, match="data file not found"):
        load_text_set(str(tmp_path / "nope.csv"), cfg(), None, True)
    import pickle

    path = tmp_path / "test_unlabelled.pkl"
    path.write_bytes(pickle.dumps({"text": ["a b", "c d"]}))
    with pytest.raises(BudgetLoraError, match="--trust-pickle"):
        load_text_set(str(path), cfg(), ["x", "y"], False)
    data, _ = load_text_set(str(path), cfg(), ["x", "y"], False, trust_pickle=True)
    assert data.texts == ["a b", "c d"] and data.labels is None and data.ids == ["0", "1"]


def test_predict_input_ids_are_kept_and_duplicates_refused(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("ID,text\n17,a\n3,b\n")
    data, _ = load_text_set(str(path), cfg(), ["x", "y"], False)
    assert data.ids == ["17", "3"] and data.labels is None
    path.write_text("ID,text\n17,a\n17,b\n")
    with pytest.raises(BudgetLoraError, match=r"p.csv line 3: duplicate ID '17'"):
        load_text_set(str(path), cfg(), ["x", "y"], False)


def test_stratified_split_is_seeded_and_proportional():
    labels = np.repeat([0, 1, 2, 3], [100, 200, 300, 400])
    train, val = stratified_split(labels, 0.1, seed=3)
    assert len(val) == 100 and np.bincount(labels[val]).tolist() == [10, 20, 30, 40]
    assert set(train).isdisjoint(val) and len(train) + len(val) == 1000
    assert np.array_equal(val, stratified_split(labels, 0.1, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])
    assert len(stratified_split(labels, 7, seed=0)[1]) == 7


def test_load_splits_on_local_agnews():
    splits = load_splits(
        cfg(
            train_file=str(AG_NEWS / "train_sample.csv"),
            test_file=str(AG_NEWS / "test.csv"),
            classes_file=str(AG_NEWS / "classes.txt"),
            val_size=500,
        ),
        seed=0,
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4500, 500, 7600)
    assert splits.label_names == ["World", "Sports", "Business", "Sci/Tech"]


def test_tokenize_cache_and_batches(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = ["the match", "stocks market shares profit today said", "a"] * 20
    first = tokenize(tok, texts, np.arange(60) % 4, max_length=5)
    assert first.lengths.max() == 5 and len(first) == 60  # truncated with specials
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npz"))) == 1
    again = tokenize(tok, texts, None, max_length=5)
    assert np.array_equal(again.ids, first.ids)

    batches = bucketed_batches(first.lengths, 8, seed=1, epoch=0)
    flat = np.concatenate(batches)
    assert len(flat) == 56 and len(set(flat)) == 56 and all(len(b) == 8 for b in batches)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, bucketed_batches(first.lengths, 8, 1, 1), strict=True))
    batch = collate(first, batches[0], pad_id=1)
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"].sum().item() == first.lengths[batches[0]].sum()
    order = np.concatenate(sorted_batches(first.lengths, batch_tokens=40, max_batch=16))
    assert sorted(order.tolist()) == list(range(60))


def test_bucketed_batches_reduce_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 128, size=4000)
    data = TokenizedSet(np.zeros(lengths.sum(), np.int32), np.concatenate([[0], np.cumsum(lengths)]), None)
    padded = sum(len(b) * data.lengths[b].max() for b in bucketed_batches(data.lengths, 16, 0, 0))
    shuffled = rng.permutation(4000)[: len(lengths) // 16 * 16].reshape(-1, 16)
    padded_random = sum(16 * lengths[b].max() for b in shuffled)
    assert padded < 0.7 * padded_random
