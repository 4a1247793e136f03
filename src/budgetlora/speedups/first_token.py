"""The last encoder layer computes only the position the classification head reads.

BERT-family sequence classifiers (BERT's pooler, the RoBERTa / XLM-R / ELECTRA heads, the linear
head with `pooling: cls`) read position 0 of the last hidden state and nothing else. In the last
layer every other position still costs its attention-output projection and its feed-forward block,
forward and backward: 10 of the layer's 12 d^2 matmul units, for all T positions, only to be
thrown away (their gradients are exact zeros). Here the last layer computes the query, attention,
output projection and feed-forward for position 0 alone, with keys and values from every position:
the same logits and the same gradients for every trainable tensor, with 1/L of the encoder's
matmul work gone on an L-layer model (a sixth on MiniLM).

The layer is changed by swapping its class for a subclass whose `forward` is written against the
submodules every BERT-style layer has (attention.self.query/key/value, attention.output,
feed_forward_chunk). Because library internals move between transformers releases, `apply` runs
the model once, in eval mode, on a small padded batch with and without the change, and keeps it
only when the logits agree; otherwise the model is left as it was.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

_LAST_LAYER = re.compile(r"(?:^|.*\.)encoder\.layer\.(\d+)$")
_SWAPPED: dict[type, type] = {}


class _FirstTokenLayer:
    """Mixin placed before a BERT-style layer class: forward for position 0 only."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, *args, **kwargs) -> torch.Tensor:
        attention = self.attention.self
        batch, length, _ = hidden_states.shape
        size = attention.attention_head_size
        first = hidden_states[:, :1]
        query = attention.query(first).view(batch, 1, -1, size).transpose(1, 2)
        key = attention.key(hidden_states).view(batch, length, -1, size).transpose(1, 2)
        value = attention.value(hidden_states).view(batch, length, -1, size).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:  # noqa: PLR2004 - batch x heads x q x k
            mask = mask[:, :, :1]  # the row of position 0 (bool or additive: SDPA takes both)
        if mask is not None and mask.dtype not in (torch.bool, query.dtype):
            mask = mask.to(query.dtype)
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            scale=attention.scaling,
            dropout_p=attention.dropout.p if self.training else 0.0,
        )
        context = context.transpose(1, 2).reshape(batch, 1, -1)
        return self.feed_forward_chunk(self.attention.output(context, first))


def _swapped_class(cls: type) -> type:
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"FirstToken{cls.__name__}", (_FirstTokenLayer, cls), {})
    return _SWAPPED[cls]


def last_layer(model: nn.Module) -> nn.Module | None:
    """The last `encoder.layer.N` module of a BERT-style encoder, if the model has one."""
    found: tuple[int, nn.Module] | None = None
    for name, module in model.named_modules():
        match = _LAST_LAYER.match(name)
        if match and (found is None or int(match.group(1)) > found[0]):
            found = (int(match.group(1)), module)
    return None if found is None else found[1]


def _has_parts(layer: nn.Module) -> bool:
    attention = getattr(getattr(layer, "attention", None), "self", None)
    return (
        attention is not None
        and callable(getattr(layer, "feed_forward_chunk", None))
        and all(hasattr(attention, a) for a in ("query", "key", "value", "attention_head_size", "scaling"))
        and isinstance(getattr(attention, "dropout", None), nn.Dropout)
        and getattr(layer.attention, "output", None) is not None
        and not getattr(layer, "add_cross_attention", False)
    )


def _probe_logits(model: nn.Module, pad_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 100))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(6, vocab), (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = pad_id, 0  # a padded row exercises the attention mask
    ids[2, 3:], mask[2, 3:] = pad_id, 0
    with torch.inference_mode():
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()


def use_first_token_last_layer(model: nn.Module, pad_id: int | None = None) -> bool:
    """Make the last layer compute position 0 only, if the model checks out (see the module
    docstring); returns whether it was applied. `model` is a classifier whose logits depend on
    position 0 of the last hidden state alone."""
    layer = last_layer(model)
    if layer is None or isinstance(layer, _FirstTokenLayer) or not _has_parts(layer):
        return False
    if pad_id is None:
        pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    original = type(layer)
    was_training = model.training
    model.eval()
    try:
        before = _probe_logits(model, pad_id)
        layer.__class__ = _swapped_class(original)
        after = _probe_logits(model, pad_id)
        same = before.shape == after.shape and torch.allclose(before, after, rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - an internal API this forward does not fit: keep the model as it was
        same = False
    if not same:
        layer.__class__ = original
    model.train(was_training)
    return same


def reads_first_token_only(cfg) -> bool:
    """Whether the configured head reads only position 0 (the model's own head is checked by
    `use_first_token_last_layer` itself; mean pooling reads every position)."""
    return cfg.head.type == "auto" or cfg.head.pooling == "cls"
