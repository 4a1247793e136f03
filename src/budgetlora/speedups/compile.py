"""`torch.compile` of the backbone with static shapes: training batches are padded to a handful
of fixed widths, each compiled once, up front (`warm_up`), so no step recompiles. Evaluation
runs eager (`eager`): its batches have free shapes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from budgetlora.runtime import autocast

CompileSetting = Union[bool, str]

# padded training widths under torch.compile: each is one compiled graph, so keep the set small
_COMPILE_WIDTHS = (32, 64, 96, 128, 192, 256, 384, 512)


def resolve_compile(setting: CompileSetting, device: torch.device) -> bool:
    """`train.compile`: auto compiles on CUDA only. On CPU the compile time does not pay back and
    inductor would change the dropout random stream."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def compile_widths(max_length: int) -> tuple[int, ...]:
    """The few padded widths a compiled model sees: fixed buckets up to `max_length` (rounded up to
    a multiple of 8), so every batch lands on an already compiled shape."""
    top = -(-max_length // 8) * 8
    return tuple(w for w in _COMPILE_WIDTHS if w < top) + (top,)


def backbone(model: nn.Module) -> nn.Module:
    # PeftModel.forward calls the base model through __call__, so compiling the base model in
    # place keeps every parameter name (adapter files, checkpoints) and PEFT's Python out of the graph
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def compile_model(model: nn.Module, widths: Sequence[int] = ()) -> nn.Module:
    """Compile the backbone in place with static shapes; returns the module that was compiled."""
    import torch._dynamo

    target = backbone(model)
    limit = max(8, 2 * len(widths) + 2)  # one graph per width, train mode only (eval runs eager)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
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


def warm_up(model: nn.Module, widths: Sequence[int], batch_size: int, device: torch.device,
            precision: str, pad_id: int, num_labels: int) -> None:
    """One forward+backward per padded width on dummy batches, so compilation happens here and
    not inside timed or logged steps. Gradients are dropped afterwards; parameters are unchanged."""
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
