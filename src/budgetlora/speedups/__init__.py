"""Speedups that leave the math as it is (or change it only where documented): compile with
fixed widths, low-rank LoRA dropout, merged prediction, packed CPU dropout masks, a last layer
that computes only the position the head reads, and glibc allocator thresholds.

On CUDA the defaults are bf16 autocast, fused AdamW, a compiled training step, low-rank dropout
and merged bf16 prediction. On CPU: fused AdamW, low-rank dropout, bf16 only where the CPU has
native bf16 matmuls (runtime.resolve_precision), no compile, and the gains of the packed masks, the
first-token layer, the allocator, tight padding (data/tokens.py) and merged prediction
(docs/speed.md has the measurements behind each choice).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from budgetlora.speedups.allocator import keep_freed_memory
from budgetlora.speedups.compile import CompiledStep, CompileReport, compile_widths, resolve_compile
from budgetlora.speedups.first_token import reads_first_token_only, use_first_token_last_layer
from budgetlora.speedups.lowrank_dropout import resolve_dropout_position, use_lowrank_dropout
from budgetlora.speedups.merge import inference_dtype, is_peft_lora, merged_copy
from budgetlora.speedups.packed_dropout import use_packed_dropout

__all__ = [
    "CompileReport",
    "CompiledStep",
    "FastPath",
    "inference_dtype",
    "is_peft_lora",
    "keep_freed_memory",
    "merged_copy",
    "prepare_for_training",
    "resolve_fast_path",
]


@dataclass
class FastPath:
    """The fast-path choices for one training run, resolved for its device."""

    compiled: bool
    dropout_position: str
    lowrank_adapters: int = 0
    pad_to: tuple[int, ...] | None = None  # fixed padded widths (compiled runs), else tokens.pad_multiple_for(device)
    packed_dropout: int = 0  # CPU: dropout modules drawing packed masks
    first_token_last_layer: bool = False  # the last layer computes position 0 only
    kept_memory: bool = False  # CPU: glibc keeps freed activation memory for reuse

    def describe(self) -> str:
        parts = [f"compile {'on' if self.compiled else 'off'}", f"LoRA dropout {self.dropout_position}"]
        if self.packed_dropout:
            parts.append("packed dropout masks")
        if self.first_token_last_layer:
            parts.append("last layer on the first token")
        if self.kept_memory:
            parts.append("freed memory kept")
        if self.pad_to:
            parts.append("widths " + "/".join(map(str, self.pad_to)))
        return ", ".join(parts)


def resolve_fast_path(cfg, device: torch.device) -> FastPath:
    """`cfg` is a budgetlora Config; only the fast-path keys are read."""
    compiled = resolve_compile(cfg.train.compile, device)
    position = resolve_dropout_position(cfg.lora.dropout_position, device)
    if cfg.mode != "lora" or not cfg.lora.dropout:
        position = "off"  # nothing to place: PEFT builds no dropout for p = 0
    pad_to = compile_widths(cfg.data.max_length) if compiled else None
    return FastPath(compiled, position, pad_to=pad_to)


def prepare_for_training(model: nn.Module, cfg, device: torch.device, precision: str, pad_id: int = 0) -> FastPath:
    """Apply the fast path's model changes to a model already on `device`; returns what was
    applied. Compiling is the training step's (training.step.step_runner, for `pad_to`)."""
    fast = resolve_fast_path(cfg, device)
    if fast.dropout_position == "lowrank":
        fast.lowrank_adapters = use_lowrank_dropout(model)
    if device.type == "cpu" and not fast.compiled:  # a compiled graph draws its own random numbers
        fast.packed_dropout = use_packed_dropout(model)
        fast.kept_memory = keep_freed_memory()
    if reads_first_token_only(cfg):
        fast.first_token_last_layer = use_first_token_last_layer(model, pad_id)
    return fast
