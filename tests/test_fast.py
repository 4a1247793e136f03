"""The fast path on a tiny random RoBERTa: low-rank-side LoRA dropout (same eval math as PEFT, less
saved activation memory), merged prediction equal to the adapter model, fixed padded widths, the
device defaults, and `budgetlora bench` end to end on synthetic ids."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from budgetlora.cli import main
from budgetlora.config import config_from_dict
from budgetlora.data.tokens import TokenizedSet, collate
from budgetlora.errors import BudgetLoraError
from budgetlora.evaluate import predict_logits
from budgetlora.runtime import Runtime
from budgetlora.speedups import merged_copy, resolve_fast_path
from budgetlora.speedups.compile import compile_widths
from budgetlora.speedups.lowrank_dropout import LowRankDropoutLinear, use_lowrank_dropout
from budgetlora.model import build_model, forward_logits

CPU = torch.device("cpu")


def _model(tiny_config, dropout: float = 0.3, **lora):
    tiny_config["lora"].update({"dropout": dropout, **lora})
    cfg = config_from_dict(tiny_config)
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    with torch.no_grad():  # B starts at zero; give the adapters a real effect so the tests can see it
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return cfg, model


def _batch(rows: int = 6, width: int = 12, vocab: int = 40) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, width // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_logits(model, batch).sum()
    return total


def test_lowrank_dropout_keeps_names_and_eval_outputs(tiny_config):
    _, model = _model(tiny_config)
    batch = _batch()
    model.eval()
    names_before = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        before = forward_logits(model, batch)
    changed = use_lowrank_dropout(model)
    assert changed == 4  # q and v in 2 layers
    assert [n for n, _ in model.named_parameters()] == names_before
    lowrank = [m for m in model.modules() if isinstance(m, LowRankDropoutLinear)]
    assert len(lowrank) == 4 and all(m.lowrank_dropout == pytest.approx(0.3) for m in lowrank)
    with torch.no_grad():
        after = forward_logits(model, batch)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_lowrank_dropout_drops_low_rank_features_and_saves_less_memory(tiny_config):
    _, model = _model(tiny_config)
    batch = _batch(rows=8, width=32)
    model.train()
    input_side = _saved_bytes(model, batch)
    use_lowrank_dropout(model)
    low_rank = _saved_bytes(model, batch)
    # PEFT keeps a dropped copy of each adapted input (32 wide) plus its mask; low-rank keeps r=4 wide
    assert low_rank < input_side
    a = next(m for m in model.modules() if isinstance(m, LowRankDropoutLinear))
    a.train()
    out = a(torch.ones(64, a.in_features))
    zero_fraction = float((out == 0).float().mean())
    assert 0.15 < zero_fraction < 0.45  # p = 0.3 of the r outputs are zeroed
    a.eval()
    torch.testing.assert_close(
        a(torch.ones(2, a.in_features)), torch.nn.functional.linear(torch.ones(2, a.in_features), a.weight)
    )


def test_lowrank_dropout_leaves_zero_dropout_and_dora_alone(tiny_config):
    _, model = _model(tiny_config, dropout=0.0)
    assert use_lowrank_dropout(model) == 0
    tiny_config["lora"]["dropout_position"] = "lowrank"
    tiny_config["lora"]["use_dora"] = True
    with pytest.raises(BudgetLoraError, match="lora.dropout_position"):
        config_from_dict(tiny_config)


def test_merged_prediction_equals_adapter_model_and_leaves_it_untouched(tiny_config):
    _, model = _model(tiny_config, dropout=0.1)
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=37)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = TokenizedSet(rng.integers(5, 40, size=int(offsets[-1])).astype(np.int32), offsets, None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = predict_logits(model, data, Runtime(CPU, "fp32"), pad_id=1, merge=True)
    unmerged = predict_logits(model, data, Runtime(CPU, "fp32"), pad_id=1, merge=False)
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    assert np.abs(unmerged).max() > 0.1  # a real prediction, not zeros
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert type(merged_copy(model)).__name__ != type(model).__name__  # a plain model, not PEFT


def test_collate_pads_to_the_smallest_fixed_width_that_fits():
    lengths = np.array([5, 17, 9])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    data = TokenizedSet(np.arange(int(offsets[-1]), dtype=np.int32) + 5, offsets, np.array([0, 1, 2]))
    assert collate(data, np.array([0, 2]), 1)["input_ids"].shape == (2, 16)  # multiple of 8
    assert collate(data, np.array([0, 2]), 1, pad_to=(32, 64))["input_ids"].shape == (2, 32)
    assert collate(data, np.array([0, 1]), 1, pad_to=(8, 16))["input_ids"].shape == (2, 24)  # none fits
    assert compile_widths(128) == (32, 64, 96, 128)
    assert compile_widths(100) == (32, 64, 96, 104)


def test_cpu_defaults_keep_the_plain_math(tiny_config):
    assert resolve_fast_path(config_from_dict(tiny_config), CPU).dropout_position == "off"  # p = 0: no dropout
    tiny_config["lora"]["dropout"] = 0.1
    fast = resolve_fast_path(config_from_dict(tiny_config), CPU)
    assert (fast.compiled, fast.dropout_position, fast.pad_to) == (False, "input", None)
    tiny_config["train"]["compile"] = True
    tiny_config["lora"]["dropout_position"] = "lowrank"
    fast = resolve_fast_path(config_from_dict(tiny_config), torch.device("cuda"))
    assert fast.compiled and fast.dropout_position == "lowrank" and fast.pad_to == (32, 64)


@pytest.mark.slow
def test_bench_runs_both_stacks_and_ends_with_the_ratio_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--device",
            "cpu",
            "--model",
            str(tiny_model_dir),
            "--synthetic",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--predict-rows",
            "64",
            "--repeats",
            "1",
            "--max-length",
            "64",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"train_speedup=(\d+\.\d\d) predict_speedup=(\d+\.\d\d)", lines[-1])
    assert match and float(match.group(1)) > 0 and float(match.group(2)) > 0
    assert any(line.startswith("(a) reference") for line in lines)
    assert any(line.startswith("(b) budgetlora") for line in lines)
    import json

    numbers = json.loads(out.read_text())
    assert numbers["reference"]["trainable"] == numbers["fast"]["16"]["trainable"] > 0
    assert numbers["train_speedup"] == pytest.approx(float(match.group(1)), abs=0.01)
