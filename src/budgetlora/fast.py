"""The fast path: low-rank-side LoRA dropout, torch.compile with few shapes, merged inference.

What is on by default where (see `resolve_fast_path`):

- CUDA: bf16 autocast, fused AdamW, `torch.compile(dynamic=False)` of the backbone with training
  batches padded to a handful of fixed widths (each compiled once, up front), LoRA dropout on the
  low-rank side, and prediction with the adapters merged into a bf16 copy of the model.
- CPU: the training math is PEFT's (fp32, input-side LoRA dropout, eager); the CPU speed comes
  from length bucketing and tight padding (data/tokens.py), from dropout masks drawn four to a
  64-bit random word (budgetlora.dropout: torch's per-element mask cost a MiniLM step 28% of its
  time), from glibc keeping freed activation memory (budgetlora.allocator), and from merged
  adapters plus inference mode at prediction time. `budgetlora bench --device cpu` measures it.
- Both: heads that read only the first position get a last layer that computes only that
  position (budgetlora.first_token), in training and in prediction.

Low-rank-side dropout. PEFT computes `B(A(dropout(x)))`, which materialises a dropped copy of every
adapted layer's input (plus its mask) and keeps it for the backward pass: one [batch, tokens,
hidden] tensor per adapted module, the reason a batch of 1024 ran an 80 GB H100 out of memory.
`lora.dropout_position: lowrank` computes `B(dropout(A(x)))` instead: the mask is drawn on the r
low-rank features, so the extra memory is [batch, tokens, r]. It is a different but equally
regularising noise (each of the r directions is dropped instead of each input feature; the
expected update is the same) and identical to PEFT in eval mode and at dropout 0.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from budgetlora.allocator import keep_freed_memory
from budgetlora.dropout import fast_dropout, use_packed_dropout
from budgetlora.first_token import reads_first_token_only, use_first_token_last_layer

CompileSetting = Union[bool, str]

# padded training widths under torch.compile: each is one compiled graph, so keep the set small
_COMPILE_WIDTHS = (32, 64, 96, 128, 192, 256, 384, 512)


def resolve_compile(setting: CompileSetting, device: torch.device) -> bool:
    """`train.compile`: auto compiles on CUDA only. On CPU (2-core runs measured with `budgetlora
    bench`) the compile time does not pay back and inductor would change the dropout random stream."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


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


def compile_widths(max_length: int) -> tuple[int, ...]:
    """The few padded widths a compiled model sees: fixed buckets up to `max_length` (rounded up to
    a multiple of 8), so every batch lands on an already compiled shape."""
    top = -(-max_length // 8) * 8
    return tuple(w for w in _COMPILE_WIDTHS if w < top) + (top,)


def _backbone(model: nn.Module) -> nn.Module:
    # PeftModel.forward calls the base model through __call__, so compiling the base model in
    # place keeps every parameter name (adapter files, checkpoints) and PEFT's Python out of the graph
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def compile_model(model: nn.Module, widths: Sequence[int] = ()) -> nn.Module:
    """Compile the backbone in place with static shapes; returns the module that was compiled."""
    import torch._dynamo

    target = _backbone(model)
    limit = max(8, 2 * len(widths) + 2)  # one graph per width, train mode only (eval runs eager)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    target.compile(dynamic=False)
    return target


def uncompile(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` uncompiled inside the block: evaluation batches have free shapes and eval mode
    would otherwise trigger a recompile per shape of the training graph."""
    saved = [(m, m._compiled_call_impl) for m in model.modules()
             if getattr(m, "_compiled_call_impl", None) is not None]
    for module, _ in saved:
        module._compiled_call_impl = None
    try:
        yield model
    finally:
        for module, compiled in saved:
            module._compiled_call_impl = compiled


def is_peft_lora(model: nn.Module) -> bool:
    return callable(getattr(model, "merge_and_unload", None))


def merged_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain model with the adapters folded into the base weights (W + s*B@A), in eval mode;
    `model` itself is left untouched (training may continue). Not a PEFT model: returned as is.

    Prediction then runs one matmul per layer instead of three plus PEFT's per-layer Python, and
    the last layer computes only the position the head reads (budgetlora.first_token)."""
    if not is_peft_lora(model):
        return model
    with eager(model):  # the copy must not inherit compiled calls bound to the original
        clone = copy.deepcopy(model)
    uncompile(clone)
    with torch.no_grad():
        merged = clone.merge_and_unload()
    use_first_token_last_layer(merged)  # checks itself: kept only where the logits are unchanged
    if dtype is not None:
        merged = merged.to(dtype)
    return merged.eval()


def inference_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Weights for prediction: bf16 on CUDA when running bf16 (half the memory traffic, no per-batch
    weight casts under autocast); CPU keeps fp32 weights."""
    if device.type == "cuda" and precision == "bf16":
        return torch.bfloat16
    return None


def sqrt_scaled_lr(lr: float, batch_size: int, base_batch: int = 16) -> float:
    """Learning rate for a larger batch: square-root scaling from the batch the LR was tuned at,
    the usual rule for Adam-type optimizers (linear scaling overshoots at large ratios)."""
    return lr * math.sqrt(batch_size / base_batch)


@dataclass
class FastPath:
    """The fast-path choices for one training run, resolved for its device."""

    compiled: bool
    dropout_position: str
    lowrank_adapters: int = 0
    pad_to: tuple[int, ...] | None = None  # fixed padded widths (compiled runs), else tokens.pad_multiple_for(device)
    packed_dropout: int = 0  # CPU: dropout modules drawing packed masks (budgetlora.dropout)
    first_token_last_layer: bool = False  # the last layer computes position 0 only (first_token.py)
    kept_memory: bool = False  # CPU: glibc keeps freed activation memory for reuse (allocator.py)

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
    compiled = resolve_compile(getattr(cfg.train, "compile", "auto"), device)
    position = resolve_dropout_position(getattr(cfg.lora, "dropout_position", "auto"), device)
    pad_to = compile_widths(cfg.data.max_length) if compiled else None
    return FastPath(compiled, position, pad_to=pad_to)


def prepare_for_training(model: nn.Module, cfg, device: torch.device, precision: str,
                         pad_id: int = 0, num_labels: int | None = None, warm: bool = True) -> FastPath:
    """Apply the fast path to a model already on `device`; returns what was applied.

    With compile on, every padded width is compiled before the first step (`warm`), so the step
    times that follow are steady; if compiling fails the model stays eager, with a warning."""
    fast = resolve_fast_path(cfg, device)
    if cfg.mode != "lora" or not cfg.lora.dropout:
        fast.dropout_position = "off"  # nothing to place: PEFT builds no dropout for p = 0
    if fast.dropout_position == "lowrank":
        fast.lowrank_adapters = use_lowrank_dropout(model)
    if device.type == "cpu":
        fast.packed_dropout = use_packed_dropout(model)
        fast.kept_memory = keep_freed_memory()
    if reads_first_token_only(cfg):
        fast.first_token_last_layer = use_first_token_last_layer(model, pad_id)
    if fast.compiled:
        compile_model(model, fast.pad_to or ())
        if warm:
            try:
                warm_up(model, fast.pad_to or (cfg.data.max_length,), cfg.train.batch_size, device,
                        precision, pad_id, num_labels or getattr(model.config, "num_labels", 2))
            except Exception as exc:  # an unsupported platform must not cost the run
                uncompile(model)
                fast.compiled, fast.pad_to = False, None
                warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); training eagerly")
    return fast


def warm_up(model: nn.Module, widths: Sequence[int], batch_size: int, device: torch.device,
            precision: str, pad_id: int, num_labels: int) -> None:
    """One forward+backward per padded width on dummy batches, so compilation happens here and
    not inside timed or logged steps. Gradients are dropped afterwards; parameters are unchanged."""
    from budgetlora.evaluate import autocast
    from budgetlora.model import forward_logits

    was_training = model.training
    model.train()
    vocab = int(getattr(model.config, "vocab_size", 1000))
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (data order) alone
    for width in widths:
        ids = torch.randint(5, max(6, vocab), (batch_size, width), generator=generator)
        mask = torch.ones(batch_size, width, dtype=torch.long)
        mask[-1, width // 2:] = 0
        ids[-1, width // 2:] = pad_id
        labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        with autocast(device, precision):
            logits = forward_logits(model, batch)
        F.cross_entropy(logits.float(), labels.to(device)).backward()
    for param in model.parameters():
        param.grad = None
    model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
