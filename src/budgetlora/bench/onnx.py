"""(c) and (d) of `budgetlora bench --onnx`: prediction through ONNX Runtime, fp32 and dynamic
int8, of the same merged model and rows as budgetlora's own PyTorch prediction (b)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from budgetlora.bench.data import BenchData
from budgetlora.bench.stacks import BenchSpec, fast_config
from budgetlora.data.tokens import collate
from budgetlora.model import build_model
from budgetlora.speedups import merged_copy


def measure_onnx(spec: BenchSpec, data: BenchData) -> dict[str, float]:
    """samples/s of ONNX Runtime (fp32, int8) over the predicted rows, and int8's agreement with fp32."""
    from budgetlora.artifacts.onnx import onnx_logits, quantize_int8, session, write_onnx

    torch.manual_seed(spec.seed)
    model = merged_copy(build_model(fast_config(spec), data.num_labels, weights=True)).float().eval()
    rows = data.test.first(spec.predict_rows)
    example = collate(rows, np.arange(min(8, len(rows))), data.pad_id, 1)
    out: dict[str, float] = {}
    logits = {}
    with tempfile.TemporaryDirectory(prefix="budgetlora-bench-onnx-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        write_onnx(model, {k: v for k, v in example.items() if k != "labels"}, fp32)
        quantize_int8(fp32, int8)
        for name, path in (("fp32", fp32), ("int8", int8)):
            sess = session(path, threads=torch.get_num_threads())
            onnx_logits(sess, rows.first(32), data.pad_id)  # warm-up
            start = time.perf_counter()
            logits[name] = onnx_logits(sess, rows, data.pad_id)
            out[f"{name}_predict_samples_per_s"] = len(rows) / (time.perf_counter() - start)
    out["int8_argmax_agreement_with_fp32"] = float((logits["int8"].argmax(1) == logits["fp32"].argmax(1)).mean())
    return out
