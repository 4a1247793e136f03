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
from budgetlora.errors import BudgetLoraError

ONNX_FILE = "model.onnx"
TRACED_OPSET = 17  # the TorchScript exporter's
DYNAMO_OPSET = 18  # the dynamo exporter's lowest


def require_onnx() -> None:
    for module in ("onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            raise BudgetLoraError(f"ONNX export and the onnxruntime backend need the {module} package: "
                                  "pip install 'budgetlora[onnx]'") from None


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
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=TRACED_OPSET,
                              dynamic_axes={"input_ids": {0: "batch", 1: "length"},
                                            "attention_mask": {0: "batch", 1: "length"}, "logits": {0: "batch"}},
                              **names)
        except Exception as traced:
            batch_dim, length = torch.export.Dim("batch"), torch.export.Dim("length")
            try:
                torch.onnx.export(wrapper, args, str(path), dynamo=True, opset_version=DYNAMO_OPSET,
                                  external_data=False, dynamic_shapes={"input_ids": {0: batch_dim, 1: length},
                                                                       "attention_mask": {0: batch_dim, 1: length}},
                                  **names)
            except Exception as exc:
                raise BudgetLoraError(f"ONNX export failed for this model (tracing: {type(traced).__name__}: "
                                      f"{str(traced)[:120]}; dynamo: {type(exc).__name__}: {str(exc)[:120]})") from None


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
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise BudgetLoraError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:160]})") from None


def export_onnx(trained: TrainedModel, out: Path, int8: bool = False, overwrite: bool = False) -> Path:
    """Write the ONNX export to `out` (built in a temp directory, checked against the run, renamed)."""
    from budgetlora.artifacts.export import check_export_target, export_meta, merged_model, probe_batch, run_logits

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
        if not np.isfinite(got).all() or (not int8 and diff > 1e-3) or agree < 0.8:
            raise BudgetLoraError(f"the ONNX model does not predict like the run (max logit difference {diff:.3g}, "
                                  f"{100 * agree:.0f}% of probe rows agree); nothing was written")
        trained.tokenizer.save_pretrained(str(tmp))
        atomic.write_json(tmp / EXPORT_META, export_meta(trained, "onnx", int8=int8, probe_max_logit_diff=diff,
                                                         probe_argmax_agreement=agree))
        write_export_card(tmp, trained, "onnx", int8=int8)
    return out


def load_onnx(path: Path) -> TrainedModel:
    from budgetlora.model import load_tokenizer

    require_onnx()
    meta = read_export_meta(path)
    cfg = export_config(meta, path)
    names = labels_of(meta, path)
    sess = session(Path(path) / ONNX_FILE)
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    shape = outputs.get("logits") or [None]
    width = shape[-1]
    if "logits" not in outputs or (isinstance(width, int) and width != len(names)):
        raise BudgetLoraError(f"{Path(path) / ONNX_FILE}: expected a 'logits' output of {len(names)} classes (as "
                              f"{EXPORT_META} lists), found {outputs}; the export is damaged or mixed up")
    return TrainedModel(cfg, sess, load_tokenizer(str(path)), names, Path(path), "onnx")


def onnx_logits(sess: Any, data: Any, pad_id: int, batch_tokens: int = 4096,
                progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Logits of every row of a TokenizedSet through ONNX Runtime, in the original order."""
    from budgetlora.data.tokens import collate, sorted_batches

    out: Optional[np.ndarray] = None
    for index in sorted_batches(data.lengths, min(batch_tokens, 4096), 64):
        batch = collate(data, index, pad_id, 1)
        logits = sess.run(["logits"], {"input_ids": batch["input_ids"].numpy(),
                                       "attention_mask": batch["attention_mask"].numpy()})[0]
        if out is None:
            out = np.empty((len(data), logits.shape[1]), dtype=np.float32)
        out[index] = logits
        if progress is not None:
            progress(len(index))
    assert out is not None, "onnx_logits needs at least one row"
    return out
