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
from budgetlora.evaluate.metrics import softmax
from budgetlora.progress import QUIET, Console


@dataclass
class Predictions:
    """Predicted classes with their probabilities, in the input's row order."""

    ids: list[str]
    indices: np.ndarray  # class index per row
    probabilities: np.ndarray  # rows x classes
    label_names: list[str]
    texts: Optional[list[str]] = None

    @property
    def labels(self) -> list[str]:
        return [self.label_names[int(i)] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def records(self) -> list[dict[str, Any]]:
        """One dict per row: id, label, class index and every class's probability."""
        return [
            {
                "id": row_id,
                **({"text": self.texts[i]} if self.texts is not None else {}),
                "label": self.label_names[int(k)],
                "index": int(k),
                "probabilities": {
                    n: round(float(p), 4) for n, p in zip(self.label_names, self.probabilities[i], strict=False)
                },
            }
            for i, (row_id, k) in enumerate(zip(self.ids, self.indices, strict=False))
        ]

    def to_csv(self, path: Union[str, Path], names: bool = False) -> Path:
        """An `ID,Label` file (class names with `names`, else class indices)."""
        from budgetlora.artifacts.run_dir import check_output_file, write_predictions_csv

        path = Path(path).expanduser()
        check_output_file(path)
        write_predictions_csv(path, self.ids, self.indices, self.label_names if names else None)
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
        )
        return texts, True
    if labeled:
        raise BudgetLoraError("evaluation needs a labeled data file")
    if not all(isinstance(t, str) for t in data):
        raise BudgetLoraError("texts to classify must be strings")
    if not data:
        raise BudgetLoraError("no texts to classify (an empty list)")
    cleaned = [clean_text(t) if trained.cfg.data.clean_text else t.strip() for t in data]
    if not all(cleaned):
        raise BudgetLoraError("empty text: give the text(s) to classify")
    return TextSet(cleaned, None, [str(i) for i in range(len(cleaned))]), False


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
            trained.tokenizer, texts.texts, texts.labels, max_length, use_cache=from_file, progress=task.advance
        )
    check_vocabulary(trained, tokens)
    cut = tokens.truncation(max_length)
    if cut["truncated"]:
        console.say(f"{cut['truncated']:,} of {cut['rows']:,} rows cut at max_length {max_length}")
    with console.task("predicting", len(texts)) as task:
        logits = _logits(trained, tokens, task.advance)
    shown = list(data) if not from_file and not isinstance(data, (str, Path)) else None
    return Predictions(texts.ids, logits.argmax(1), softmax(logits), trained.label_names, shown), texts.labels


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
