"""Prediction for a trained model: texts or a data file in, classes and probabilities out, with
the run's own text cleaning, columns and truncation, through PyTorch (sharded across ranks under
torchrun) or ONNX Runtime."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from budgetlora.errors import BudgetLoraError
from budgetlora.progress import QUIET, Console
from budgetlora.task import PAIR, REGRESSION, Decisions, LabelSpace


@dataclass
class Predictions:
    """A model's answers in the input's row order, under its decisions (task.Decisions):
    single-label: a class per row with every class's probability; multi-label: a set of labels per
    row with every label's probability; regression: a value per target."""

    ids: list[str]
    outputs: np.ndarray  # the model's raw outputs, rows x outputs
    space: LabelSpace
    decisions: Decisions
    texts: Optional[list[str]] = None
    pairs: Optional[list[str]] = None

    @property
    def task(self) -> str:
        return self.space.task

    @property
    def label_names(self) -> list[str]:
        return list(self.space.names)

    @property
    def answers(self) -> np.ndarray:
        """Class indices, a rows x labels boolean matrix, or rows x targets values."""
        return self.decisions.decide(self.outputs)

    @property
    def indices(self) -> np.ndarray:
        """Single-label: the class index per row."""
        if self.task != "single_label":
            raise BudgetLoraError(f"a {self.task} model has no single class per row; use .answers or .labels")
        return self.answers

    @property
    def probabilities(self) -> np.ndarray:
        """rows x classes: softmax (single-label, at the run's temperature) or per-label sigmoid
        (multi-label); regression: the values."""
        return self.decisions.scores(self.outputs)

    @property
    def labels(self) -> list[Any]:
        """Per row: the class name, the list of label names, or the value(s) (one target: a float)."""
        names, answers = self.label_names, self.answers
        if self.task == "single_label":
            return [names[int(i)] for i in answers]
        if self.task == "multi_label":
            return [[names[i] for i in np.flatnonzero(row)] for row in answers]
        values = answers.reshape(len(answers), -1)
        return [float(row[0]) if values.shape[1] == 1 else [float(v) for v in row] for row in values]

    def __len__(self) -> int:
        return len(self.outputs)

    def records(self) -> list[dict[str, Any]]:
        """One dict per row: id, (text), the answer and every class's probability or every target's value."""
        out = []
        scores = self.probabilities
        for i, (row_id, label) in enumerate(zip(self.ids, self.labels, strict=False)):
            record: dict[str, Any] = {"id": row_id}
            if self.texts is not None:
                record["text"] = self.texts[i]
            if self.pairs is not None:
                record["pair"] = self.pairs[i]
            if self.task == "single_label":
                record.update(label=label, index=int(self.answers[i]))
            elif self.task == "multi_label":
                record["labels"] = label
            else:
                record["values"] = dict(zip(self.label_names, map(float, np.atleast_1d(self.answers[i])), strict=False))
                out.append(record)
                continue
            record["probabilities"] = {n: round(float(p), 4) for n, p in zip(self.label_names, scores[i], strict=False)}
            out.append(record)
        return out

    def to_csv(
        self, path: Union[str, Path], names: bool = False, probabilities: bool = False, separator: str = ","
    ) -> Path:
        """single-label: `ID,Label` (class names with `names`, else class indices); multi-label:
        `ID,Labels` (names joined by `separator`); regression: `ID,Score` (one column per target
        when there are several). `probabilities` adds one column per class or label."""
        from budgetlora.artifacts.run_dir import check_output_file, write_predictions_csv, write_table_csv

        path = Path(path).expanduser()
        check_output_file(path)
        if self.task == "single_label" and not probabilities:
            write_predictions_csv(path, self.ids, self.indices, self.label_names if names else None)
            return path
        if self.task == "regression":
            values = self.answers.reshape(len(self), -1)
            header = ["ID", "Score"] if values.shape[1] == 1 else ["ID", *self.label_names]
            write_table_csv(path, header, ([i, *map(float, row)] for i, row in zip(self.ids, values, strict=True)))
            return path
        if self.task == "single_label":
            header = ["ID", "Label"]
            answers: list[Any] = [self.label_names[int(i)] if names else int(i) for i in self.indices]
        else:
            header = ["ID", "Labels"]
            answers = [separator.join(row) for row in self.labels]
        extra = [f"p:{n}" for n in self.label_names] if probabilities else []
        scores = self.probabilities
        rows = (
            [row_id, answer, *([round(float(p), 6) for p in scores[i]] if probabilities else [])]
            for i, (row_id, answer) in enumerate(zip(self.ids, answers, strict=True))
        )
        write_table_csv(path, header + extra, rows)
        return path


def _data_cfg(trained: Any, fmt: Optional[str], text_columns: Optional[Sequence[str]]) -> Any:
    data_cfg = trained.cfg.data
    if fmt:
        data_cfg = dataclasses.replace(data_cfg, format=fmt)
    if text_columns:
        data_cfg = dataclasses.replace(data_cfg, text_columns=list(text_columns))
    return data_cfg


def check_data_trust(run: Any, data: Path, fmt: Optional[str], trust_pickle: bool) -> None:
    """Refuse an untrusted pickle from the run's settings alone, before its model loads."""
    from budgetlora.artifacts.loading import data_config
    from budgetlora.data import check_trust

    cfg = data_config(run.path)
    check_trust(str(data), dataclasses.replace(cfg, format=fmt) if fmt else cfg, trust_pickle)


def _texts(
    trained: Any,
    data: Union[str, Path, Sequence[str]],
    labeled: bool,
    trust_pickle: bool,
    fmt: Optional[str],
    text_columns: Optional[Sequence[str]],
) -> tuple[Any, bool]:
    """The rows to predict (a TextSet), and whether they came from a file (cacheable tokens)."""
    from budgetlora.data import TextSet, clean_text, load_text_set
    from budgetlora.data.dataset import indices_mean_names
    from budgetlora.data.labels import check_scored_targets
    from budgetlora.data.sources import SUFFIX_FORMATS

    if isinstance(data, str) and not os.path.isfile(data):
        looks_like_file = Path(data).suffix.lower() in SUFFIX_FORMATS and not any(c.isspace() for c in data)
        if looks_like_file or labeled:
            raise BudgetLoraError(
                f"data file not found: {data}"
                + ("" if labeled else " (to classify this string as text, pass it in a list)")
            )
        data = [data]
    if isinstance(data, (str, Path)):
        if not Path(data).exists():
            raise BudgetLoraError(f"data file not found: {data}")
        cfg = trained.cfg.data
        explicit = cfg.label_names is not None or cfg.classes_file is not None
        texts, _ = load_text_set(
            str(data),
            _data_cfg(trained, fmt, text_columns),
            trained.label_names,
            labeled,
            trust_pickle,
            indices_ok=indices_mean_names(trained.label_names, explicit),
            task=trained.space.task,
        )
        if labeled and texts.labels is not None and trained.space.task == REGRESSION:
            check_scored_targets(texts.labels, trained.label_names, str(data))
        return texts, True
    if labeled:
        raise BudgetLoraError("evaluation needs a labeled data file")
    if not data:
        raise BudgetLoraError("no texts to classify (an empty list)")
    first, second = _sides(trained, data)

    def clean(text: str) -> str:
        return clean_text(text) if trained.cfg.data.clean_text else text.strip()

    cleaned = [clean(t) for t in first]
    pairs = [clean(t) for t in second] if second is not None else None
    if not all(cleaned) or (pairs is not None and not all(pairs)):
        raise BudgetLoraError(
            "empty text: give the text(s) to classify" + (" (both sides of each pair)" if pairs else "")
        )
    return TextSet(cleaned, None, [str(i) for i in range(len(cleaned))], pairs), False


def _sides(trained: Any, data: Sequence[Any]) -> tuple[list[str], Optional[list[str]]]:
    """The texts of a list: strings, or for a text-pair model (text, pair) tuples or "text<TAB>pair"."""
    if not trained.cfg.data.text_pair_columns:
        if not all(isinstance(t, str) for t in data):
            raise BudgetLoraError("texts to classify must be strings")
        return list(data), None
    first, second = [], []
    for item in data:
        if isinstance(item, str) and item.count("\t") == 1:
            item = item.split("\t")
        if not (isinstance(item, (tuple, list)) and len(item) == PAIR and all(isinstance(t, str) for t in item)):
            raise BudgetLoraError(
                f"this model reads text pairs ({', '.join(trained.cfg.data.text_pair_columns)}): give each row as "
                f"(text, pair) or as one string with a tab between the two, not {str(item)[:60]!r}"
            )
        first.append(item[0])
        second.append(item[1])
    return first, second


def predict_data(
    trained: Any,
    data: Union[str, Path, Sequence[str]],
    labeled: bool,
    trust_pickle: bool = False,
    fmt: Optional[str] = None,
    text_columns: Optional[Sequence[str]] = None,
    console: Console = QUIET,
) -> tuple[Any, Optional[np.ndarray]]:
    """(Predictions, labels or None) for texts or a data file."""
    from budgetlora.data import tokenize

    texts, from_file = _texts(trained, data, labeled, trust_pickle, fmt, text_columns)
    max_length = trained.cfg.data.max_length
    with console.task("tokenizing", len(texts)) as task:
        tokens = tokenize(
            trained.tokenizer,
            texts.texts,
            texts.labels,
            max_length,
            use_cache=from_file,
            progress=task.advance,
            pairs=texts.pairs,
            segments=trained.segments,
        )
    check_vocabulary(trained, tokens)
    cut = tokens.truncation(max_length)
    if cut["truncated"]:
        console.say(f"{cut['truncated']:,} of {cut['rows']:,} rows cut at max_length {max_length}")
    with console.task("predicting", len(texts)) as task:
        logits = _logits(trained, tokens, task.advance)
    shown = None
    if not from_file and not isinstance(data, (str, Path)):
        shown = [d if isinstance(d, str) else d[0] for d in data]
    predictions = Predictions(
        texts.ids, logits, trained.space, trained.decisions, shown, texts.pairs if not from_file else None
    )
    return predictions, texts.labels


def check_vocabulary(trained: Any, tokens: Any) -> None:
    """Every token id must have a row in the model's embedding: a tokenizer that is not the
    model's (an edited tokenizer.json) would otherwise index past it."""
    vocab = getattr(getattr(trained.model, "config", None), "vocab_size", None)
    highest = int(tokens.ids.max(initial=0))
    if isinstance(vocab, int) and highest >= vocab:
        raise BudgetLoraError(
            f"{trained.source}: its tokenizer gives token id {highest:,} but the model embeds only "
            f"{vocab:,} ids; the tokenizer does not belong to this model"
        )


def _logits(trained: Any, tokens: Any, progress: Any) -> np.ndarray:
    from budgetlora.model import pad_token_id

    pad_id = pad_token_id(trained.tokenizer)
    batch = trained.cfg.prediction_batch
    if trained.kind == "onnx":
        from budgetlora.artifacts.onnx import onnx_logits

        return onnx_logits(trained.model, tokens, pad_id, batch, progress)
    from budgetlora.evaluate.predict import predict_logits
    from budgetlora.runtime import process_runtime

    device = next(trained.model.parameters()).device
    with process_runtime(str(device), trained.cfg.train.precision) as rt:
        return predict_logits(trained.model, tokens, rt, pad_id, batch, progress=progress)
