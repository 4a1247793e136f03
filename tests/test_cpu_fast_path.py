"""The CPU side of the fast path on a tiny random RoBERTa: packed dropout masks (the right rate,
the right scale, exact gradients, reproducible from the seed, every dropout site of the model
reached), the last layer computed for the first position only (same logits and gradients, kept
only where the model checks out), unrounded padding on CPU, and the glibc allocator setting."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

from budgetlora.config import config_from_dict
from budgetlora.data.tokens import TokenizedSet, collate, pad_multiple_for
from budgetlora.speedups.packed_dropout import (
    ATTENTION_NAME,
    PackedDropout,
    _sdpa_with_packed_dropout,
    effective_rate,
    fast_dropout,
    keep_mask,
    use_packed_dropout,
)
from budgetlora.evaluate import predict_logits
from budgetlora.runtime import Runtime
from budgetlora.speedups import merged_copy, prepare_for_training
from budgetlora.speedups.first_token import _FirstTokenLayer, last_layer, use_first_token_last_layer
from budgetlora.model import build_model, forward_logits

CPU = torch.device("cpu")


def _model(
    tiny_config, head: dict | None = None, dropout: float = 0.0, targets=("q", "k", "v", "o", "ffn_in", "ffn_out")
):
    tiny_config["lora"].update({"dropout": dropout, "targets": list(targets)})
    if head:
        tiny_config["head"] = head
    cfg = config_from_dict(tiny_config)
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    with torch.no_grad():  # B starts at zero; give the adapters a real effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return cfg, model


def _batch(rows: int = 5, width: int = 14) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 40, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[1, 9:], mask[3, 4:] = 0, 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------- packed dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_keep_mask_keeps_the_requested_fraction(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1000]), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    # 1e6 Bernoulli draws: the standard error is below 0.0005
    assert abs(mask.float().mean().item() - (1 - p)) < 0.003
    assert abs(effective_rate(p) - p) <= 0.5 / 65536
    # neighbouring elements come from different 16-bit parts of one word: no visible correlation
    flat = mask.flatten().float()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01


def test_fast_dropout_scales_kept_values_and_passes_exact_gradients():
    torch.manual_seed(1)
    x = torch.randn(300, 70, requires_grad=True)
    out = fast_dropout(x, 0.2, training=True)
    kept = out != 0
    scale = 1 / (1 - effective_rate(0.2))
    torch.testing.assert_close(out[kept], x.detach()[kept] * scale)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad * kept * scale)
    assert fast_dropout(x, 0.2, training=False) is x  # eval: untouched, as F.dropout


def test_fast_dropout_is_reproducible_from_the_seed_and_resumable_from_the_rng_state():
    x = torch.ones(64, 33)
    torch.manual_seed(7)
    first = fast_dropout(x, 0.1, True)
    state = torch.get_rng_state()
    second = fast_dropout(x, 0.1, True)
    torch.manual_seed(7)
    assert torch.equal(fast_dropout(x, 0.1, True), first)
    torch.set_rng_state(state)
    assert torch.equal(fast_dropout(x, 0.1, True), second)
    assert not torch.equal(first, second)


def test_packed_dropout_reaches_every_site_and_leaves_names_and_eval_outputs(tiny_config):
    _, model = _model(tiny_config, dropout=0.1)
    batch = _batch()
    model.eval()
    names = list(model.state_dict())
    with torch.no_grad():
        before = forward_logits(model, batch)
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    assert use_packed_dropout(model) == len(dropouts) > 0
    assert not [m for m in model.modules() if type(m) is nn.Dropout and m.p > 0]
    assert all(type(m) is PackedDropout for m in dropouts)
    assert model.base_model.model.config._attn_implementation == ATTENTION_NAME
    assert list(model.state_dict()) == names
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, batch), before)
    model.train()
    torch.manual_seed(0)
    noisy = forward_logits(model, batch)
    noisy.sum().backward()
    assert not torch.allclose(noisy, before)  # dropout is active in training


def test_attention_with_packed_dropout_is_sdpa_when_nothing_is_dropped():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, 4:] = False
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, dropout=0.0)
    # a rate below the 1/65536 grid runs the packed path and keeps every element
    got, _ = _sdpa_with_packed_dropout(module, q, k, v, mask, scaling=0.3, dropout=1e-7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~mask, torch.finfo(torch.float32).min)
    got, _ = _sdpa_with_packed_dropout(module, q, k, v, additive, scaling=0.3, dropout=1e-7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    dropped, _ = _sdpa_with_packed_dropout(module, q, k, v, mask, scaling=0.3, dropout=0.5)
    assert not torch.allclose(dropped, expected)


def test_cpu_training_preparation_uses_packed_masks_and_keeps_peft_input_dropout(tiny_config):
    cfg, model = _model(tiny_config, dropout=0.1)
    fast = prepare_for_training(model, cfg, CPU, "fp32", pad_id=1)
    assert fast.packed_dropout > 0 and fast.dropout_position == "input" and not fast.compiled
    assert "packed dropout masks" in fast.describe()
    lora_dropouts = [m for name, m in model.named_modules() if ".lora_dropout." in name]
    assert lora_dropouts and all(type(m) is PackedDropout for m in lora_dropouts)


# ------------------------------------------------------------------------ first-token last layer


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    forward_logits(model, batch).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head", [None, {"type": "linear", "pooling": "cls"}])
def test_first_token_last_layer_gives_the_same_logits_and_gradients(tiny_config, head):
    _, model = _model(tiny_config, head=head)
    reference = copy.deepcopy(model)
    assert use_first_token_last_layer(model, pad_id=1)
    assert isinstance(last_layer(model), _FirstTokenLayer)
    assert not use_first_token_last_layer(model, pad_id=1)  # applied once
    batch = _batch()
    for m in (model, reference):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(model, batch), forward_logits(reference, batch), rtol=1e-5, atol=1e-6)
    for m in (model, reference):  # train mode, without dropout noise, to compare gradients
        m.train()
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    got, expected = _grads(model, batch), _grads(reference, batch)
    assert got.keys() == expected.keys() and len(got) > 4
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    last = [n for n in expected if ".layer.1." in n and "lora_B" in n]
    assert last and all(expected[n].abs().max() > 0 for n in last)  # the last layer's adapters do train


def test_first_token_last_layer_is_refused_where_the_head_reads_every_position(tiny_config):
    _, model = _model(tiny_config, head={"type": "linear", "pooling": "mean"})
    layer_class = type(last_layer(model))
    assert not use_first_token_last_layer(model, pad_id=1)
    assert type(last_layer(model)) is layer_class


def test_first_token_last_layer_is_refused_when_the_check_disagrees(tiny_config, monkeypatch):
    import budgetlora.speedups.first_token as first_token

    _, model = _model(tiny_config)
    layer_class = type(last_layer(model))

    def wrong(self, hidden_states, attention_mask=None, *args, **kwargs):
        return hidden_states[:, :1] * 0  # a forward that no longer fits the library's layer

    # transformers wraps a layer class's forward when the class is made: patch before it is
    monkeypatch.setattr(first_token._FirstTokenLayer, "forward", wrong)
    monkeypatch.setattr(first_token, "_SWAPPED", {})
    assert not use_first_token_last_layer(model, pad_id=1)
    assert type(last_layer(model)) is layer_class


def test_merged_prediction_uses_the_first_token_layer_and_equals_the_adapter_model(tiny_config):
    _, model = _model(tiny_config)
    assert isinstance(last_layer(merged_copy(model)), _FirstTokenLayer)
    assert not isinstance(last_layer(model), _FirstTokenLayer)  # the trained model is not changed
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=23)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = TokenizedSet(rng.integers(5, 40, size=int(offsets[-1])).astype(np.int32), offsets, None)
    np.testing.assert_allclose(
        predict_logits(model, data, Runtime(CPU, "fp32"), pad_id=1, merge=True),
        predict_logits(model, data, Runtime(CPU, "fp32"), pad_id=1, merge=False),
        atol=1e-5,
    )


# ---------------------------------------------------------------------------------- padding


def test_cpu_batches_pad_to_the_longest_row_and_gpus_to_a_multiple_of_8():
    assert pad_multiple_for(CPU) == 1 and pad_multiple_for(torch.device("cuda")) == 8
    lengths = np.array([5, 17, 9])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = TokenizedSet(np.arange(int(offsets[-1]), dtype=np.int32) + 5, offsets, np.array([0, 1, 2]))
    assert collate(data, np.array([0, 2]), 1, pad_multiple_for(CPU))["input_ids"].shape == (2, 9)


# ---------------------------------------------------------------------------------- allocator


def test_allocator_thresholds_are_set_on_glibc_unless_the_user_chose(monkeypatch):
    import platform

    import budgetlora.speedups.allocator as allocator

    for name in [n for n in os.environ if n.startswith("MALLOC_")] + ["GLIBC_TUNABLES", "LD_PRELOAD"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "_applied", None)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert allocator.keep_freed_memory() is glibc
    for env in (
        {"MALLOC_ARENA_MAX": "2"},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
    ):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            m.setattr(allocator, "_applied", None)
            assert allocator.keep_freed_memory() is False, env
