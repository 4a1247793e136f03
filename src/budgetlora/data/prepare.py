"""The data a run trains and evaluates on: the splits, tokenized (from the disk cache when the same
tokenizer saw the same texts), with a note of the rows cut at `data.max_length`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from budgetlora.config import DataConfig
from budgetlora.data.dataset import Splits, load_splits
from budgetlora.data.tokens import TokenizedSet, tokenize, tokens_fingerprint
from budgetlora.progress import QUIET, Console


@dataclass
class Prepared:
    splits: Splits
    tokenizer: Any
    train: TokenizedSet
    val: Optional[TokenizedSet]
    test: Optional[TokenizedSet]

    @property
    def fingerprint(self) -> str:
        """The hash of what training sees (train and validation tokens and labels)."""
        return tokens_fingerprint(self.train, self.val)


def prepare_data(
    cfg: DataConfig, seed: int, tokenizer: Any, trust_pickle: bool = False, console: Console = QUIET
) -> Prepared:
    splits = load_splits(cfg, seed, trust_pickle)

    def tok(texts: Any, name: str) -> Optional[TokenizedSet]:
        if texts is None:
            return None
        with console.task(f"tokenizing {name}", len(texts)) as task:
            return tokenize(tokenizer, texts.texts, texts.labels, cfg.max_length, progress=task.advance)

    prepared = Prepared(splits, tokenizer, tok(splits.train, "train"), tok(splits.val, "val"), tok(splits.test, "test"))
    for name, part in (("train", prepared.train), ("test", prepared.test)):
        cut = part.truncation(cfg.max_length) if part is not None else None
        if cut and cut["truncated"]:
            console.say(
                f"{name}: {cut['truncated']:,} of {cut['rows']:,} rows ({100 * cut['truncated_fraction']:.1f}%) "
                f"cut at data.max_length {cut['max_length']} (token lengths p50 {cut['p50']}, p90 "
                f"{cut['p90']}, p99 {cut['p99']}, max {cut['max']})"
            )
    return prepared
