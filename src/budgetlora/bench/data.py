"""The benchmark's data: AG News token ids for the benchmarked model (its tokenizer, else
MiniLM's), or synthetic ids with AG News' length distribution, and the FLOPs they cost."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetlora.config import DataConfig
from budgetlora.data import AGNEWS_NAMES, TokenizedSet, load_text_set, tokenize
from budgetlora.errors import BudgetLoraError
from budgetlora.model import MINILM_ALIAS, load_tokenizer, pad_token_id

# the AG News files of a checkout of this repository (../shared beside it), unless told otherwise
DEFAULT_DATA = Path(
    os.environ.get("BUDGETLORA_AGNEWS", Path(__file__).resolve().parents[4] / "shared" / "data" / "ag_news")
)
NUM_LABELS = 4


@dataclass
class BenchData:
    train: TokenizedSet
    test: TokenizedSet
    pad_id: int
    tokenizer: object  # for DataCollatorWithPadding
    note: str
    num_labels: int = NUM_LABELS


def _bench_tokenizer(model: str) -> tuple[object, str]:
    """The model's own tokenizer, else the packaged MiniLM one (roberta-base has none offline)."""
    try:
        return load_tokenizer(model), "the model's tokenizer"
    except BudgetLoraError:
        return load_tokenizer(MINILM_ALIAS), (
            f"{model} has no tokenizer offline: MiniLM WordPiece ids and lengths (ids modulo the model's vocabulary)"
        )


def synthetic_lengths(n: int, seed: int, max_length: int) -> np.ndarray:
    """Token lengths shaped like AG News under a WordPiece tokenizer (mean ~51-53, long right
    tail): a gamma distribution, clipped to [8, max_length]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.gamma(11.5, 4.6, size=n)), 8, max_length).astype(np.int64)


def synthetic_set(n: int, seed: int, max_length: int, vocab: int) -> TokenizedSet:
    lengths = synthetic_lengths(n, seed, max_length)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(5, vocab, size=int(offsets[-1]), dtype=np.int64).astype(np.int32)
    labels = rng.integers(0, NUM_LABELS, size=n)
    return TokenizedSet(ids, offsets, labels)


def load_bench_data(
    model: str, data_dir: Path | None, vocab: int, max_length: int, synthetic: bool = False, seed: int = 0
) -> BenchData:
    """AG News token ids for `model` (its tokenizer, else MiniLM's), or synthetic ids with AG
    News' length distribution when there is no data or no tokenizer at all."""
    tokenizer, how = None, ""
    try:
        tokenizer, how = _bench_tokenizer(model)
    except BudgetLoraError:
        synthetic = True
    train_file = data_dir / "train_sample.csv" if data_dir else None
    test_file = data_dir / "test.csv" if data_dir else None
    if not synthetic and (not train_file or not train_file.is_file() or not test_file.is_file()):
        synthetic = True
    if synthetic:
        note = "synthetic ids with AG News' length distribution" + ("" if tokenizer else " (no tokenizer available)")
        return BenchData(
            synthetic_set(5000, seed, max_length, vocab),
            synthetic_set(7600, seed + 7, max_length, vocab),
            pad_token_id(tokenizer) if tokenizer else 0,
            tokenizer,
            note,
        )
    cfg = DataConfig(train_file=str(train_file), max_length=max_length)
    names = list(AGNEWS_NAMES)
    sets = []
    for path in (train_file, test_file):
        texts, _ = load_text_set(str(path), cfg, names, True)
        tokens = tokenize(tokenizer, texts.texts, texts.labels, max_length)
        if int(tokens.ids.max(initial=0)) >= vocab:
            tokens = TokenizedSet(tokens.ids % vocab, tokens.offsets, tokens.labels)
        sets.append(tokens)
    note = f"AG News {train_file.name} / {test_file.name}, {how}"
    return BenchData(sets[0], sets[1], pad_token_id(tokenizer), tokenizer, note)


def forward_flops_per_row(config, lengths: np.ndarray) -> float:
    """Mean forward FLOPs of one row (real tokens only, no padding): the encoder's linear layers
    (2 FLOPs per weight per token) plus attention scores and mixing (4 * T^2 * hidden per layer)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    ff = getattr(config, "intermediate_size", 4 * d)
    t = lengths.astype(np.float64)
    per_layer = 2 * (4 * d * d + 2 * d * ff) * t + 4 * t * t * d
    return float((layers * per_layer).mean())


def recipe_bench_data(cfg) -> BenchData:
    """A config's own data (`bench --config`): its training rows to train on, its test rows (else
    its validation rows) to predict, tokenized by its model's tokenizer."""
    from budgetlora.data import load_splits

    splits = load_splits(cfg.data, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    rows = splits.test if splits.test is not None and len(splits.test) else splits.val
    if rows is None or not len(rows):
        raise BudgetLoraError(
            "bench --config needs rows to predict: the config has neither a test split nor a validation split"
        )
    train = tokenize(tokenizer, splits.train.texts, splits.train.labels, cfg.data.max_length)
    test = tokenize(tokenizer, rows.texts, rows.labels, cfg.data.max_length)
    source = cfg.data.train_file or cfg.data.dataset
    return BenchData(
        train, test, pad_token_id(tokenizer), tokenizer, f"the config's data ({source})", len(splits.label_names)
    )
