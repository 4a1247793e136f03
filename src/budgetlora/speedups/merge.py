"""Prediction through a merged copy: the adapters folded into the base weights (W + s*B@A), so
each layer runs one matmul instead of three plus PEFT's per-layer Python."""

from __future__ import annotations

import copy

import torch
from torch import nn

from budgetlora.speedups.first_token import use_first_token_last_layer


def is_peft_lora(model: nn.Module) -> bool:
    return callable(getattr(model, "merge_and_unload", None))


def merged_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain model with the adapters folded in, in eval mode; `model` itself is left untouched
    (training may continue). A model that is not a PEFT model is returned as is. The last layer
    computes only the position the head reads where that is exact (speedups.first_token)."""
    if not is_peft_lora(model):
        return model
    clone = copy.deepcopy(model)
    with torch.no_grad():
        merged = clone.merge_and_unload()
    use_first_token_last_layer(merged)  # checks itself: kept only where the logits are unchanged
    if dtype is not None:
        merged = merged.to(dtype)
    return merged.eval()


def inference_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Weights for prediction: bf16 when the run computes in bf16 (half the memory traffic, no
    per-batch weight casts under autocast; on CPU only where bf16 was chosen or asked for), else
    the fp32 master weights."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.bfloat16
    return None
