"""The encoders people use: DeBERTa-v2/v3 and ModernBERT (short target names on exact module
paths, their heads, budgets from the architecture formula), end to end on tiny random configs;
and an unknown encoder, targeted by exact module paths."""

from __future__ import annotations

import json

import pytest

from budgetlora.config import config_from_dict
from budgetlora.errors import BudgetLoraError
from budgetlora.model import build_meta_model, count_trainable, max_rank, target_module_paths

from helpers import build_tiny_encoder, synthetic_rows, write_csv


def _meta(model: str, **lora) -> tuple:
    cfg = config_from_dict(
        {"model": model, "data": {"train_file": "-"}, "head": {"type": "auto"}, "lora": {"r": 1, **lora}}
    )
    return cfg, build_meta_model(cfg, 4)


# hub architectures known offline: trainable = head + r * slope (per rank: in + out of every adapted module)
@pytest.mark.parametrize(
    "model, targets, head, slope, best_r",
    [
        ("microsoft/deberta-v3-base", ["q", "v"], 768 * 768 + 768 + 768 * 4 + 4, 12 * 2 * (768 + 768), 11),
        ("answerdotai/ModernBERT-base", ["qkv"], 768 * 768 + 768 + 768 * 4 + 4, 22 * (768 + 3 * 768), 6),
        ("roberta-base", ["q", "v"], 768 * 768 + 768 + 768 * 4 + 4, 12 * 2 * (768 + 768), 11),
    ],
)
def test_budget_counts_follow_the_architecture_formula(model, targets, head, slope, best_r):
    for r in (1, 2, 7):
        cfg, meta = _meta(model, targets=targets)
        cfg.lora.r = r
        assert count_trainable(build_meta_model(cfg, 4)).trainable == head + r * slope
    cfg, _ = _meta(model, targets=targets)
    rank, count = max_rank(cfg, 4, 1_000_000)
    assert (rank, count) == (best_r, head + best_r * slope)
    assert head + (best_r + 1) * slope > 1_000_000


def _paths(model: str, **lora) -> dict:
    import torch

    from budgetlora.model import build_base_model

    cfg, _ = _meta(model, **lora)
    with torch.device("meta"):
        return target_module_paths(build_base_model(cfg, 4, weights=False), cfg)


def test_deberta_and_modernbert_short_names_are_exact_module_paths():
    paths = _paths("microsoft/deberta-v3-base", targets=["q", "k", "v", "o", "ffn_in", "ffn_out"], layers=[0])
    assert paths == {
        "deberta.encoder.layer.0.attention.self.query_proj": "q",
        "deberta.encoder.layer.0.attention.self.key_proj": "k",
        "deberta.encoder.layer.0.attention.self.value_proj": "v",
        "deberta.encoder.layer.0.attention.output.dense": "o",
        "deberta.encoder.layer.0.intermediate.dense": "ffn_in",
        "deberta.encoder.layer.0.output.dense": "ffn_out",
    }
    assert _paths("answerdotai/ModernBERT-base", targets=["qkv", "o", "ffn_in", "ffn_out"], layers=[3]) == {
        "model.layers.3.attn.Wqkv": "qkv",
        "model.layers.3.attn.Wo": "o",
        "model.layers.3.mlp.Wi": "ffn_in",
        "model.layers.3.mlp.Wo": "ffn_out",
    }
    _, meta = _meta("answerdotai/ModernBERT-base", targets=["qkv", "o", "ffn_in", "ffn_out"], layers=[3])
    report = count_trainable(meta)
    assert set(report.breakdown) == {
        "head",
        "lora_A.qkv",
        "lora_B.qkv",
        "lora_A.o",
        "lora_B.o",
        "lora_A.ffn_in",
        "lora_B.ffn_in",
        "lora_A.ffn_out",
        "lora_B.ffn_out",
    }


def test_fused_and_missing_short_names_are_refused_with_the_fix():
    with pytest.raises(BudgetLoraError, match=r"fused projection \(attn.Wqkv\); target 'qkv' instead"):
        _meta("answerdotai/ModernBERT-base", targets=["q", "v"])
    with pytest.raises(BudgetLoraError, match=r"\['qkv'\] do not exist in 'roberta-base'"):
        _meta("roberta-base", targets=["qkv"])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder-data")
    return write_csv(root / "train.csv", synthetic_rows(160, 1)), write_csv(root / "test.csv", synthetic_rows(48, 2))


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type, targets, head",
    [
        ("deberta-v2", ["q", "v", "o"], {"type": "auto"}),
        ("modernbert", ["qkv", "ffn_out"], {"type": "auto"}),
        ("modernbert", ["qkv"], {"type": "linear", "pooling": "mean"}),
    ],
)
def test_train_predict_export_on_tiny_random_encoders(model_type, targets, head, tiny_data, tmp_path):
    import budgetlora

    model = build_tiny_encoder(tmp_path / "model", model_type)
    run = budgetlora.train(
        {
            "name": "enc",
            "model": str(model),
            "head": head,
            "data": {"train_file": str(tiny_data[0]), "test_file": str(tiny_data[1]), "val_size": 16, "max_length": 32},
            "lora": {"r": 2, "targets": targets, "dropout": 0.1},
            "train": {"max_steps": 6, "eval_every": 6, "lr": 1e-2, "batch_size": 8},
        },
        out=tmp_path / "runs",
        quiet=True,
    )
    summary = run.summary
    assert summary.test.n == 48 and set(summary.label_names) == {"0", "1", "2", "3"}
    assert {k.split(".")[-1] for k in summary.breakdown if k.startswith("lora_")} == set(targets)
    texts = ["stocks market shares", "match goal team"]
    before = run.predict(texts)
    export = budgetlora.load(run.export(tmp_path / "export"))
    after = export.predict(texts)
    assert list(before.indices) == list(after.indices)
    assert abs(before.probabilities - after.probabilities).max() < 1e-4
    meta = json.loads((tmp_path / "export" / "budgetlora.json").read_text())
    assert meta["kind"] == "merged" and meta["reload_max_logit_diff"] < 1e-3


@pytest.mark.slow
def test_an_unknown_encoder_lists_its_linear_modules_and_trains_on_exact_paths(tiny_data, tmp_path):
    import budgetlora

    model = build_tiny_encoder(tmp_path / "albert", "albert")
    raw = {
        "name": "albert",
        "model": str(model),
        "data": {"train_file": str(tiny_data[0]), "val_size": 16, "max_length": 32},
        "lora": {"r": 2, "targets": ["q", "v"]},
        "train": {"max_steps": 2, "eval_every": None},
    }
    with pytest.raises(BudgetLoraError) as info:
        budgetlora.train(raw, out=tmp_path / "runs", quiet=True)
    message = str(info.value)
    assert "no short target names" in message and "lora.target_modules" in message
    assert "encoder.albert_layer_groups.N.albert_layers.N.attention.query" in message
    assert not (tmp_path / "runs").exists()
    raw["lora"] = {
        "r": 2,
        "targets": [],
        "target_modules": [
            "encoder.albert_layer_groups.0.albert_layers.0.attention.query",
            "encoder.albert_layer_groups.0.albert_layers.0.attention.value",
        ],
    }
    run = budgetlora.train(raw, out=tmp_path / "runs", quiet=True)
    assert run.summary.breakdown["lora_A.other"] == 2 * 2 * 32
    raw["lora"]["target_modules"] = ["encoder.albert_layer_groups.0.albert_layers.0.attention.quer"]
    with pytest.raises(BudgetLoraError, match="is not a Linear module.*near matches: .*attention.query"):
        budgetlora.train(raw, out=tmp_path / "runs", quiet=True)
