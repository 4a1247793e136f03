"""Dropout whose mask costs a fraction of torch's on CPU.

On CPU torch draws one Mersenne-Twister number per element for a dropout mask (`bernoulli_`), on
one thread, which makes masking an activation cost about as much as the matmul that produced it
(docs/speed.md has the measurements). Here one 64-bit draw gives four 16-bit uniforms and an element is
kept when its uniform is at least round(p * 65536): the same Bernoulli(1 - p) keep mask with p on
a 1/65536 grid, at about a third of the cost (forward and backward). The draws come from torch's
default generator, so `torch.manual_seed` and the RNG state saved in checkpoints still make a run
exactly repeatable and resumable.

Three places draw masks in an encoder with PEFT LoRA: `nn.Dropout` modules (the model's hidden
dropout and PEFT's `lora_dropout`), the low-rank dropout of `speedups.lowrank_dropout`, and the dropout on
attention probabilities, which transformers passes into `scaled_dot_product_attention`. The last
is reached through a registered attention implementation that, in training on CPU, computes
softmax(QK^T) with this mask, and otherwise hands over to transformers' own SDPA function.
CUDA keeps torch's dropout everywhere: its Philox generator is parallel and cheap. Inside a
compiled graph torch's dropout is used too: the compiler generates its own random numbers, and an
autograd Function drawing from the global generator would break the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_GRID = 65536  # 16-bit uniforms
ATTENTION_NAME = "budgetlora_sdpa"


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask, True with probability 1 - round(p * 65536) / 65536, drawn four to a 64-bit word."""
    numel = shape.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    return words.view(torch.int16)[:numel].view(shape) >= (-_GRID // 2 + round(p * _GRID))


def effective_rate(p: float) -> float:
    """The drop probability `keep_mask` realises for a requested `p`."""
    return round(p * _GRID) / _GRID


class _PackedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        # the mask kept for backward holds the scale (0 or 1/(1-p)) in x's dtype: 4 bytes an element
        # where torch keeps 1, but multiplying by a bool mask converts it on every use (3% of a step)
        mask = keep_mask(x.shape, p).to(x.dtype).mul_(1.0 / (1.0 - effective_rate(p)))
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with packed masks for CPU tensors in eager mode."""
    if not training or p == 0.0 or x.device.type != "cpu" or x.numel() == 0 or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    return _PackedDropout.apply(x, p)


class PackedDropout(nn.Dropout):
    """`nn.Dropout` with packed masks on CPU; swapped in by class, so state dicts are untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def use_packed_dropout(model: nn.Module) -> int:
    """Swap every active `nn.Dropout` of `model` (the backbone's and PEFT's; attention modules hold
    one for its rate) for `PackedDropout`, and route attention-probability dropout through
    `ATTENTION_NAME` where the model dispatches attention through transformers' AttentionInterface.
    Returns how many dropout modules changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = PackedDropout
            changed += 1
    if changed:
        _use_packed_attention_dropout(model)
    return changed


def _sdpa_with_packed_dropout(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling=None,
    dropout: float = 0.0,
    **kwargs,
):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu" or key.shape[1] != query.shape[1] or torch.compiler.is_compiling():
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # what SDPA's math kernel computes in training, with the mask drawn here
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout, True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # an older transformers without the interface: SDPA keeps its dropout
        return False
    AttentionInterface.register(ATTENTION_NAME, _sdpa_with_packed_dropout)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return True


def _use_packed_attention_dropout(model: nn.Module) -> None:
    """Point every (sub-)config that uses SDPA at the packed-dropout attention; models that do not
    dispatch through AttentionInterface never read it and keep SDPA's own dropout."""
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"
    }
    if configs and _register_attention():
        for config in configs.values():
            config._attn_implementation = ATTENTION_NAME
