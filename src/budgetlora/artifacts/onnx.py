"""ONNX exports for ONNX Runtime: the merged model as `model.onnx` (inputs `input_ids`,
`attention_mask`; output `logits`; dynamic batch and length), optionally with dynamic int8
quantization of its weights, plus the tokenizer, `budgetlora.json` and a model card.
`pip install 'budgetlora[onnx]'` brings onnx, onnxscript and onnxruntime."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from budgetlora import atomic
from budgetlora.artifacts.run_dir import EXPORT_META, export_config, labels_of, read_export_meta
from budgetlora.artifacts.model_card import write_export_card
from budgetlora.artifacts.trained import TrainedModel
from budgetlora.config import PredictionBatch
from budgetlora.errors import BudgetLoraError, first_line

ONNX_FILE = "model.onnx"
TRACED_OPSET = 17  # the TorchScript exporter's
DYNAMO_OPSET = 18  # the dynamo exporter's lowest


def require_onnx() -> None:
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise BudgetLoraError(
                f"ONNX export and the onnxruntime backend need the {module} package: pip install 'budgetlora[onnx]'"
            ) from None


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def write_onnx(model: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
    """Export with TorchScript tracing on an example `batch` (faster ONNX Runtime graphs on CPU than
    the dynamo exporter here); the dynamo exporter is the fallback where tracing fails."""
    args = (batch["input_ids"], batch["attention_mask"])
    wrapper = _Logits(model).eval()  # the exporter restores the wrapper's mode afterwards: eval, not train
    names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's deprecation notes
        try:
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamo=False,
                opset_version=TRACED_OPSET,
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "length"},
                    "attention_mask": {0: "batch", 1: "length"},
                    "logits": {0: "batch"},
                },
                **names,
            )
        except Exception as traced:  # noqa: BLE001 - the tracer's many failure types: try the dynamo exporter
            batch_dim, length = torch.export.Dim("batch"), torch.export.Dim("length")
            try:
                torch.onnx.export(
                    wrapper,
                    args,
                    str(path),
                    dynamo=True,
                    opset_version=DYNAMO_OPSET,
                    external_data=False,
                    dynamic_shapes={
                        "input_ids": {0: batch_dim, 1: length},
                        "attention_mask": {0: batch_dim, 1: length},
                    },
                    **names,
                )
            except Exception as exc:  # noqa: BLE001 - both exporters failed: one line naming both
                raise BudgetLoraError(
                    f"ONNX export failed for this model (tracing: {type(traced).__name__}: "
                    f"{str(traced)[:120]}; dynamo: {type(exc).__name__}: {str(exc)[:120]})"
                ) from None


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8: weights quantized per output channel (per-tensor scales cost MiniLM several
    points of agreement), activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


def _omp_threads() -> int:
    """OMP_NUM_THREADS as a count (it may also be a list like "4,2", of which the first counts)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def session(path: Path, threads: Optional[int] = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or _omp_threads() or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = SILENT
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise BudgetLoraError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") from None


def export_onnx(trained: TrainedModel, out: Path, int8: bool = False, overwrite: bool = False) -> Path:
    """Write the ONNX export to `out` (built in a temp directory, checked against the run, renamed)."""
    from budgetlora.artifacts.export import (
        check_export_target,
        export_meta,
        merged_model,
        probe_batch,
        run_logits,
        seal,
    )

    require_onnx()
    check_export_target(out, overwrite, trained.source)
    model = merged_model(trained)
    with atomic.atomic_dir(out, replace=True) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            fp32 = Path(scratch) / ONNX_FILE
            write_onnx(model, probe_batch(trained.tokenizer), fp32)
            if int8:
                quantize_int8(fp32, tmp / ONNX_FILE)
            else:
                os.replace(fp32, tmp / ONNX_FILE)
        batch = probe_batch(trained.tokenizer)
        expected = run_logits(trained, batch)  # the run as trained (unmerged): a merge error shows too
        got = session(tmp / ONNX_FILE).run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
        diff = float(np.abs(expected - got).max())
        agree = float((expected.argmax(1) == got.argmax(1)).mean())
        if not np.isfinite(got).all() or (not int8 and diff > FP32_TOLERANCE) or agree < MIN_INT8_AGREEMENT:
            raise BudgetLoraError(
                f"the ONNX model does not predict like the run (max logit difference {diff:.3g}, "
                f"{100 * agree:.0f}% of probe rows agree); nothing was written"
            )
        trained.tokenizer.save_pretrained(str(tmp))
        write_export_card(tmp, trained, "onnx", int8=int8)
        seal(
            tmp,
            export_meta(trained, "onnx", int8=int8, probe_max_logit_diff=diff, probe_argmax_agreement=agree),
            ONNX_FILE,
        )
    return out


FP32_TOLERANCE = 1e-3  # the largest logit difference an fp32 export may show against the run
MIN_INT8_AGREEMENT = 0.8  # the share of probe rows whose class an int8 export must keep
INPUTS = ("input_ids", "attention_mask")
MATRIX = 2  # inputs and logits are batch x something
PROBE_TIMEOUT_S, BATCH_TIMEOUT_S = 60.0, 600.0  # a probe row takes milliseconds, a batch of 64 rows seconds
SILENT = 4  # ONNX Runtime's log level FATAL: its own error lines would duplicate budgetlora's one line
PROBE_MAX_TOKENS = 4096  # the load-time probe row: data.max_length, at most this


def check_session(sess: Any, file: Path, classes: int, max_length: int) -> None:
    """The graph takes exactly what budgetlora feeds (int64 input_ids and attention_mask of rank 2)
    and gives `logits` of rank 2 with `classes` columns, finite, for a row of `max_length` tokens."""
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    if set(inputs) != set(INPUTS) or any(
        inputs[n].type != "tensor(int64)" or len(inputs[n].shape) != MATRIX for n in INPUTS
    ):
        found = {n: (i.type, i.shape) for n, i in inputs.items()}
        raise BudgetLoraError(
            f"{file}: expected the inputs input_ids and attention_mask (int64, batch x length), "
            f"found {found}; not a budgetlora export"
        )
    shape = outputs.get("logits")
    if shape is None or len(shape) != MATRIX or (isinstance(shape[-1], int) and shape[-1] != classes):
        raise BudgetLoraError(
            f"{file}: expected a 'logits' output of batch x {classes} classes (as {EXPORT_META} "
            f"lists), found {outputs}; the export is damaged or mixed up"
        )
    probe = np.full((1, min(max_length, PROBE_MAX_TOKENS)), 5, dtype=np.int64)
    logits = run_session(sess, probe, np.ones_like(probe), file, PROBE_TIMEOUT_S)
    if logits.shape != (1, classes):
        raise BudgetLoraError(
            f"{file}: a row of {max_length} tokens (data.max_length) gave logits of shape "
            f"{logits.shape}, not (1, {classes}); the export is damaged or mixed up"
        )


def run_session(
    sess: Any, ids: np.ndarray, mask: np.ndarray, file: Path, timeout_s: float = BATCH_TIMEOUT_S
) -> np.ndarray:
    """One batch through ONNX Runtime: its errors (a graph that cannot take these shapes, an
    allocation it cannot make, a batch still running after `timeout_s`, which ONNX Runtime is told
    to abandon) and non-finite logits are one BudgetLoraError naming the file."""
    import threading

    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = SILENT
    timer = threading.Timer(timeout_s, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask}, options)[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's Fail / InvalidArgument / RuntimeException types
        stopped = "terminate flag" in str(exc)
        raise BudgetLoraError(
            f"{file}: ONNX Runtime "
            + (
                f"was still computing a batch of {ids.shape[0]} x "
                f"{ids.shape[1]} tokens after {timeout_s:.0f} s, and was stopped"
                if stopped
                else f"failed on a batch of {ids.shape[0]} x {ids.shape[1]} tokens ({first_line(exc, 160)})"
            )
            + "; the export is damaged or does not fit its data.max_length"
        ) from None
    finally:
        timer.cancel()
    logits = np.asarray(logits)
    if logits.ndim != MATRIX or logits.shape[0] != ids.shape[0]:
        raise BudgetLoraError(f"{file}: logits of shape {logits.shape} for {ids.shape[0]} rows; the export is damaged")
    if not np.isfinite(logits).all():
        raise BudgetLoraError(f"{file}: the model gave NaN or infinite logits; the export is damaged")
    return logits


def load_onnx(path: Path) -> TrainedModel:
    from budgetlora.artifacts.export import check_weights
    from budgetlora.model import load_tokenizer

    require_onnx()
    meta = read_export_meta(path)
    cfg = export_config(meta, path)
    names = labels_of(meta, path)
    file = Path(path) / ONNX_FILE
    check_weights(path, meta, ONNX_FILE)
    tokenizer = load_tokenizer(str(path))
    sess = session(file)
    check_session(sess, file, len(names), cfg.data.max_length)
    sess.budgetlora_file = file
    return TrainedModel(cfg, sess, tokenizer, names, Path(path), "onnx")


ONNX_MAX_TOKENS, ONNX_MAX_ROWS = 4096, 64  # CPU batches, as evaluate.predict's


def onnx_logits(
    sess: Any,
    data: Any,
    pad_id: int,
    batch: Optional[PredictionBatch] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> np.ndarray:
    """Logits of every row of a TokenizedSet through ONNX Runtime, in the original order."""
    from budgetlora.data.tokens import collate, sorted_batches

    out: Optional[np.ndarray] = None
    file = getattr(sess, "budgetlora_file", Path(ONNX_FILE))
    tokens, rows = (batch.tokens, batch.rows) if batch is not None else (ONNX_MAX_TOKENS, ONNX_MAX_ROWS)
    for index in sorted_batches(data.lengths, min(tokens, ONNX_MAX_TOKENS), min(rows, ONNX_MAX_ROWS)):
        inputs = collate(data, index, pad_id, 1)
        logits = run_session(sess, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), file)
        if out is None:
            out = np.empty((len(data), logits.shape[1]), dtype=np.float32)
        out[index] = logits
        if progress is not None:
            progress(len(index))
    assert out is not None, "onnx_logits needs at least one row"
    return out
