"""The data a run trains and evaluates on: the splits, tokenized (from the disk cache when the same
tokenizer saw the same texts), with a note of the rows cut at `data.max_length`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from budgetlora.config import DataConfig
from budgetlora.data.dataset import Splits, load_splits
from budgetlora.data.tokens import TokenizedSet, tokenize, tokens_fingerprint
from budgetlora.progress import QUIET, Console
from budgetlora.task import REGRESSION, LabelSpace


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

    def label_space(self, standardize: bool) -> LabelSpace:
        """The outputs the model learns; regression targets standardised on the training rows."""
        splits = self.splits
        if splits.task != REGRESSION or not standardize:
            return LabelSpace(splits.task, tuple(splits.label_names))
        labels = np.asarray(self.train.labels, dtype=np.float64)
        std = labels.std(0)
        return LabelSpace(
            splits.task,
            tuple(splits.label_names),
            tuple(float(m) for m in labels.mean(0)),
            tuple(float(s) if s > 0 else 1.0 for s in std),
        )

    def in_model_units(self, space: LabelSpace) -> "Prepared":
        """The training labels as the loss sees them (standardised regression targets); validation
        and test keep the targets' own units (their scoring maps outputs back)."""
        if not space.target_mean:
            return self
        mean, std = np.asarray(space.target_mean), np.asarray(space.target_std)
        labels = ((np.asarray(self.train.labels, dtype=np.float64) - mean) / std).astype(np.float32)
        return dataclasses.replace(self, train=dataclasses.replace(self.train, labels=labels))


def prepare_data(
    cfg: DataConfig,
    seed: int,
    tokenizer: Any,
    trust_pickle: bool = False,
    console: Console = QUIET,
    task: str = "single_label",
    segments: bool = False,
) -> Prepared:
    """The splits of `cfg`, tokenized (text pairs with segment ids when `segments`: the model has
    segment embeddings)."""
    splits = load_splits(cfg, seed, trust_pickle, task)

    def tok(texts: Any, name: str) -> Optional[TokenizedSet]:
        if texts is None:
            return None
        with console.task(f"tokenizing {name}", len(texts)) as progress:
            return tokenize(
                tokenizer,
                texts.texts,
                texts.labels,
                cfg.max_length,
                progress=progress.advance,
                pairs=texts.pairs,
                segments=segments,
            )

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
