"""Inference over a tokenized set: length-sorted batches through a merged copy of the model,
logits back in the original row order (sharded across ranks under torchrun)."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from budgetlora.config import PredictionBatch
from budgetlora.data.tokens import TokenizedSet, collate, pad_multiple_for, sorted_batches
from budgetlora.distributed import gather_rows
from budgetlora.evaluate.scoring import score_split
from budgetlora.model import forward_logits
from budgetlora.runtime import Runtime, autocast
from budgetlora.speedups import inference_dtype, keep_freed_memory, merged_copy
from budgetlora.task import Decisions, LabelSpace

# a few thousand tokens already keep CPU matmuls efficient; bigger sorted batches only add padding
# and fall out of cache (docs/speed.md)
CPU_BATCH_TOKENS, CPU_MAX_BATCH = 4096, 64


DEFAULT_BATCH = PredictionBatch(tokens=16384, rows=128)  # Config().prediction_batch


def predict_logits(
    model: nn.Module,
    data: TokenizedSet,
    rt: Runtime,
    pad_id: int,
    batch: PredictionBatch = DEFAULT_BATCH,
    merge: bool = True,
    progress: Optional[Callable[[int], None]] = None,
) -> np.ndarray:
    """Logits for every row of `data`, in the original row order (batches are length-sorted).

    With `merge`, a LoRA model predicts through a copy with the adapters folded into the base
    weights (bf16 weights under bf16); `model` itself is not changed. Prediction runs eagerly (only
    the training step is compiled): its batches have free shapes. Under `rt.dist` each rank predicts every
    world_size-th batch and all ranks get every row back in order. `progress(n)` is called as
    batches finish."""
    device, dist = rt.device, rt.dist
    if device.type == "cpu":
        keep_freed_memory()
        batch = PredictionBatch(min(batch.tokens, CPU_BATCH_TOKENS), min(batch.rows, CPU_MAX_BATCH))
    was_training = model.training
    model.eval()
    assert len(data) > 0, "predict_logits needs at least one row"
    indices, outputs = [np.zeros(0, dtype=np.int64)], [np.zeros((0, 0), dtype=np.float32)]
    net = merged_copy(model, inference_dtype(device, rt.precision)) if merge else model
    with torch.inference_mode():
        batches = sorted_batches(data.lengths, batch.tokens, batch.rows)
        for index in batches[dist.rank :: dist.world_size]:
            inputs = collate(data, index, pad_id, pad_multiple_for(device))
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items() if k != "labels"}
            with autocast(device, rt.precision):
                indices.append(index)
                outputs.append(forward_logits(net, inputs).float().cpu().numpy())
            if progress is not None:
                progress(len(index) * dist.world_size)
    del net
    model.train(was_training)
    rows = np.concatenate(outputs[1:]) if len(outputs) > 1 else outputs[0]
    return gather_rows(np.concatenate(indices), rows, len(data), dist)


def evaluate_split(
    model: nn.Module,
    data: Optional[TokenizedSet],
    space: LabelSpace,
    decisions: Decisions,
    rt: Runtime,
    pad_id: int,
    batch: PredictionBatch,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[Optional[dict], Optional[np.ndarray]]:
    """Metrics and answers of a labeled split under `decisions` (None, None without one)."""
    if data is None or len(data) == 0 or data.labels is None:
        return None, None
    logits = predict_logits(model, data, rt, pad_id, batch, progress=progress)
    return score_split(space, decisions, logits, data.labels)
