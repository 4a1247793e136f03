"""LoRA dropout on the low-rank side: `B(dropout(A(x)))` instead of PEFT's `B(A(dropout(x)))`.

PEFT materialises a dropped copy of every adapted layer's input (plus its mask) and keeps it for
the backward pass: one [batch, tokens, hidden] tensor per adapted module, which is what limits the
batch size on a GPU. Here the mask is drawn on the r low-rank features, so the extra memory is
[batch, tokens, r]. It is a different but equally regularising noise (each of the r directions is
dropped instead of each input feature; the expected update is the same) and identical to PEFT in
eval mode and at dropout 0.
"""

from __future__ import annotations

import torch
from torch import nn

from budgetlora.speedups.packed_dropout import fast_dropout


def resolve_dropout_position(setting: str, device: torch.device) -> str:
    """`lora.dropout_position`: auto is lowrank on CUDA (memory) and input (PEFT's math) on CPU."""
    if setting == "auto":
        return "lowrank" if device.type == "cuda" else "input"
    return setting


class LowRankDropoutLinear(nn.Linear):
    """A LoRA `A` projection that applies dropout to its r outputs: dropout(x @ A^T).

    Installed by swapping the class of PEFT's existing `lora_A` module, so the parameter (and its
    name in state dicts, adapter files and checkpoints) is untouched."""

    lowrank_dropout: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(super().forward(x), self.lowrank_dropout, self.training)


def use_lowrank_dropout(model: nn.Module) -> int:
    """Move PEFT LoRA dropout from the layer input to the low-rank side; returns how many adapters
    changed. DoRA layers keep PEFT's input dropout (their magnitude term reuses the dropped input)."""
    changed = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        for name, dropout in list(dropouts.items()):
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0 or name in variants:
                continue
            a = lora_a[name] if name in lora_a else None
            if type(a) is not nn.Linear:
                continue
            a.__class__ = LowRankDropoutLinear
            a.lowrank_dropout = float(dropout.p)
            dropouts[name] = nn.Identity()
            changed += 1
    return changed
