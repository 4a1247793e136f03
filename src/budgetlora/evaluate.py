"""Inference over a tokenized set and the metrics reported for it."""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from budgetlora.allocator import keep_freed_memory
from budgetlora.data.tokens import TokenizedSet, collate, pad_multiple_for, sorted_batches
from budgetlora.distributed import SINGLE, DistContext, gather_rows
from budgetlora.model import forward_logits
from budgetlora.stats import wilson_interval


CPU_BATCH_TOKENS, CPU_MAX_BATCH = 4096, 64


def autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16") and device.type in ("cuda", "cpu"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def predict_logits(model: nn.Module, data: TokenizedSet, device: torch.device, pad_id: int,
                   precision: str = "fp32", batch_tokens: int = 16384, max_batch: int = 256,
                   merge: bool = True, dist: DistContext = SINGLE) -> np.ndarray:
    """Logits for every row of `data`, in the original row order (batches are length-sorted).

    With `merge`, a LoRA model predicts through a copy with the adapters folded into the base
    weights (bf16 weights on CUDA bf16); `model` itself is not changed. A compiled model runs eager
    here: prediction batches have free shapes. Under `dist` each rank predicts every world_size-th
    batch and all ranks get every row back in order."""
    from budgetlora.fast import eager, inference_dtype, merged_copy

    if device.type == "cpu":
        keep_freed_memory()
        # ~2-4k tokens already keep CPU matmuls efficient; bigger sorted batches only add padding
        # (the longest row of a big batch sets its width) and fall out of cache: measured 20-25% slower
        batch_tokens, max_batch = min(batch_tokens, CPU_BATCH_TOKENS), min(max_batch, CPU_MAX_BATCH)
    was_training = model.training
    model.eval()
    assert len(data) > 0, "predict_logits needs at least one row"
    indices, outputs = [np.zeros(0, dtype=np.int64)], [np.zeros((0, 0), dtype=np.float32)]
    with eager(model):
        net = merged_copy(model, inference_dtype(device, precision)) if merge else model
        with torch.inference_mode():
            batches = sorted_batches(data.lengths, batch_tokens, max_batch)
            for index in batches[dist.rank::dist.world_size]:
                batch = collate(data, index, pad_id, pad_multiple_for(device))
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "labels"}
                with autocast(device, precision):
                    indices.append(index)
                    outputs.append(forward_logits(net, batch).float().cpu().numpy())
    del net
    model.train(was_training)
    rows = np.concatenate(outputs[1:]) if len(outputs) > 1 else outputs[0]
    return gather_rows(np.concatenate(indices), rows, len(data), dist)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def classification_metrics(labels: np.ndarray, preds: np.ndarray, names: Sequence[str],
                           logits: Optional[np.ndarray] = None) -> dict:
    """Accuracy with n and 95% Wilson CI, macro-F1, per-class P/R/F1 and the confusion matrix
    (rows: true class, columns: predicted class)."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    correct = int(np.trace(confusion))
    n = int(len(labels))
    low, high = wilson_interval(correct, n)
    per_class, f1s = {}, []
    for i, name in enumerate(names):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i].sum() if confusion[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[i].sum())}
        f1s.append(f1)
    metrics = {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct,
               "ci_low": low, "ci_high": high, "macro_f1": float(np.mean(f1s)),
               "per_class": per_class, "confusion_matrix": confusion.tolist()}
    if logits is not None:
        metrics["loss"] = cross_entropy(logits, labels)
    return metrics


def format_metrics(metrics: dict, names: Sequence[str]) -> str:
    """The human-readable report: headline, per-class table, confusion matrix."""
    acc, low, high = metrics["accuracy"], metrics["ci_low"], metrics["ci_high"]
    lines = [f"accuracy {100 * acc:.2f}% (95% CI {100 * low:.2f}-{100 * high:.2f}, "
             f"n={metrics['n']:,}, correct={metrics['correct']:,})  macro-F1 {100 * metrics['macro_f1']:.2f}"]
    width = max(len(n) for n in names)
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name in names:
        row = metrics["per_class"][name]
        lines.append(f"{name:<{width}}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  "
                     f"{row['f1']:>5.4f}  {row['support']:>7,}")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * (width + 2) + " ".join(f"{n[:7]:>7}" for n in names))
    for name, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>7,}" for v in row))
    return "\n".join(lines)
