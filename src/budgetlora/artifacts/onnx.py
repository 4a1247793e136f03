"""ONNX exports for ONNX Runtime: the merged model as `model.onnx` (inputs `input_ids`,
`attention_mask`, and `token_type_ids` for a text-pair run whose model has segments; output
`logits`, with the run's decisions baked in; dynamic batch and length), optionally with dynamic
int8 quantization of its weights, plus the tokenizer, `budgetlora.json` and a model card.
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
from budgetlora.artifacts.export_meta import decisions_of, export_config, read_export_meta, space_of
from budgetlora.artifacts.run_dir import EXPORT_META
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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **segments).logits


def write_onnx(model: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
    """Export with TorchScript tracing on an example `batch` (faster ONNX Runtime graphs on CPU than
    the dynamo exporter here); the dynamo exporter is the fallback where tracing fails. The graph's
    inputs are the batch's: input_ids, attention_mask and, for pairs with segments, token_type_ids."""
    inputs = [name for name in (*INPUTS, SEGMENTS) if name in batch]
    args = tuple(batch[name] for name in inputs)
    wrapper = _Logits(model).eval()  # the exporter restores the wrapper's mode afterwards: eval, not train
    names = {"input_names": inputs, "output_names": ["logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's deprecation notes
        try:
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamo=False,
                opset_version=TRACED_OPSET,
                dynamic_axes={**{name: {0: "batch", 1: "length"} for name in inputs}, "logits": {0: "batch"}},
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
                    dynamic_shapes={name: {0: batch_dim, 1: length} for name in inputs},
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
        RELOAD_TOLERANCE,
        check_export_target,
        expected_outputs,
        export_meta,
        merged_model,
        output_tolerance,
        probe_batch,
        seal,
    )

    require_onnx()
    check_export_target(out, overwrite, trained.source)
    model = merged_model(trained)
    batch = probe_batch(trained.tokenizer, bool(trained.cfg.data.text_pair_columns), trained.segments)
    with atomic.atomic_dir(out, replace=True) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:
            fp32 = Path(scratch) / ONNX_FILE
            write_onnx(model, batch, fp32)
            if int8:
                quantize_int8(fp32, tmp / ONNX_FILE)
            else:
                os.replace(fp32, tmp / ONNX_FILE)
        # the run as trained (unmerged), its decisions applied: a merge or baking error shows too
        expected = expected_outputs(trained, batch)
        got = session(tmp / ONNX_FILE).run(["logits"], {k: v.numpy() for k, v in batch.items()})[0]
        diff = float(np.abs(expected - got).max())
        agree = float(_same_answers(trained.cfg.task, expected, got).mean())
        tolerance = FP32_TOLERANCE * output_tolerance(trained) / RELOAD_TOLERANCE
        if not np.isfinite(got).all() or (not int8 and diff > tolerance) or agree < MIN_INT8_AGREEMENT:
            raise BudgetLoraError(
                f"the ONNX model does not predict like the run (max logit difference {diff:.3g}, "
                f"{100 * agree:.0f}% of probe rows agree); nothing was written"
            )
        trained.tokenizer.save_pretrained(str(tmp))
        _save_config(model, tmp, trained)
        write_export_card(tmp, trained, "onnx", int8=int8)
        seal(
            tmp,
            export_meta(
                trained,
                "onnx",
                int8=int8,
                probe_max_logit_diff=diff,
                probe_argmax_agreement=agree,
                inputs=sorted(batch, key=[*INPUTS, SEGMENTS].index),
            ),
            ONNX_FILE,
        )
    return out


def _save_config(model: nn.Module, tmp: Path, trained: TrainedModel) -> None:
    """config.json beside model.onnx: problem_type, id2label and the baked decisions, for tools
    that read an ONNX folder the way they read a Transformers one (no auto_map: no code here)."""
    import copy

    from budgetlora.artifacts.export import describe_outputs

    config = copy.deepcopy(model.config)
    for key in ("auto_map", "architectures"):
        if hasattr(config, key):
            setattr(config, key, None)
    describe_outputs(config, trained)
    config.save_pretrained(str(tmp))


FP32_TOLERANCE = 1e-3  # the largest logit difference an fp32 export may show against the run
MIN_INT8_AGREEMENT = 0.8  # the share of probe rows whose class an int8 export must keep
INPUTS = ("input_ids", "attention_mask")
SEGMENTS = "token_type_ids"  # a third input, for text pairs on a model with segment ids
REGRESSION_AGREEMENT = 0.05  # an int8 regression answer "agrees" within 5% of the targets' spread


def _same_answers(task: str, expected: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per probe row: the export answers as the run does (argmax, every label's side of 0, or a
    value within REGRESSION_AGREEMENT of the run's)."""
    if task == "single_label":
        return expected.argmax(1) == got.argmax(1)
    if task == "multi_label":
        return ((expected > 0) == (got > 0)).all(1)
    spread = max(float(np.abs(expected).max()), 1.0)
    return (np.abs(expected - got) <= REGRESSION_AGREEMENT * spread).all(1)


MATRIX = 2  # inputs and logits are batch x something
PROBE_TIMEOUT_S, BATCH_TIMEOUT_S = 60.0, 600.0  # a probe row takes milliseconds, a batch of 64 rows seconds
SILENT = 4  # ONNX Runtime's log level FATAL: its own error lines would duplicate budgetlora's one line
PROBE_MAX_TOKENS = 4096  # the load-time probe row: data.max_length, at most this


def check_session(sess: Any, file: Path, classes: int, max_length: int, segments: bool = False) -> None:
    """The graph takes exactly what budgetlora feeds (int64 input_ids and attention_mask of rank 2,
    and token_type_ids for a pair export with segments) and gives `logits` of rank 2 with `classes`
    columns, finite, for a row of `max_length` tokens."""
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    wanted = (*INPUTS, SEGMENTS) if segments else INPUTS
    if set(inputs) != set(wanted) or any(
        inputs[n].type != "tensor(int64)" or len(inputs[n].shape) != MATRIX for n in wanted
    ):
        found = {n: (i.type, i.shape) for n, i in inputs.items()}
        raise BudgetLoraError(
            f"{file}: expected the inputs {', '.join(wanted)} (int64, batch x length), "
            f"found {found}; not a budgetlora export"
        )
    shape = outputs.get("logits")
    if shape is None or len(shape) != MATRIX or (isinstance(shape[-1], int) and shape[-1] != classes):
        raise BudgetLoraError(
            f"{file}: expected a 'logits' output of batch x {classes} classes (as {EXPORT_META} "
            f"lists), found {outputs}; the export is damaged or mixed up"
        )
    probe = np.full((1, min(max_length, PROBE_MAX_TOKENS)), 5, dtype=np.int64)
    logits = run_session(
        sess, probe, np.ones_like(probe), file, PROBE_TIMEOUT_S, np.zeros_like(probe) if segments else None
    )
    if logits.shape != (1, classes):
        raise BudgetLoraError(
            f"{file}: a row of {max_length} tokens (data.max_length) gave logits of shape "
            f"{logits.shape}, not (1, {classes}); the export is damaged or mixed up"
        )


def run_session(
    sess: Any,
    ids: np.ndarray,
    mask: np.ndarray,
    file: Path,
    timeout_s: float = BATCH_TIMEOUT_S,
    segments: Optional[np.ndarray] = None,
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
        feed = {"input_ids": ids, "attention_mask": mask}
        if segments is not None:
            feed[SEGMENTS] = segments
        logits = sess.run(["logits"], feed, options)[0]
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
    space = space_of(meta, path)
    decisions = decisions_of(meta, path, space)
    file = Path(path) / ONNX_FILE
    check_weights(path, meta, ONNX_FILE)
    tokenizer = load_tokenizer(str(path))
    sess = session(file)
    segments = SEGMENTS in (meta.get("inputs") or [])
    check_session(sess, file, space.width, cfg.data.max_length, segments)
    sess.budgetlora_file = file
    return TrainedModel(cfg, sess, tokenizer, list(space.names), Path(path), "onnx", space, decisions)


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
        segments = inputs[SEGMENTS].numpy() if SEGMENTS in inputs else None
        logits = run_session(
            sess, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), file, segments=segments
        )
        if out is None:
            out = np.empty((len(data), logits.shape[1]), dtype=np.float32)
        out[index] = logits
        if progress is not None:
            progress(len(index))
    assert out is not None, "onnx_logits needs at least one row"
    return out
