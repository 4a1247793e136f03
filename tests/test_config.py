from __future__ import annotations

import pytest

from budgetlora.config import config_from_dict, load_config, parse_override
from budgetlora.errors import BudgetLoraError

BASE = {"data": {"train_file": "x.csv"}}


def test_defaults_and_types():
    cfg = config_from_dict(BASE, {"train.lr": 1, "lora.targets": "q,k"})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.lora.targets == ["q", "k"] and cfg.budget == 1_000_000


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.learning_rate": 1e-4}, r"unknown config key 'train.learning_rate'.*valid keys in train: lr"),
        ({"lora.r": "four"}, r"'lora.r': got 'four', expected an integer"),
        ({"train.optimizer": "adam"}, r"'train.optimizer'.*one of 'adamw', 'rmsprop', 'adagrad', 'sgd'"),
        (
            {"lora.targets": ["q", "query"]},
            r"unknown target\(s\) \['query'\]; valid: q, k, v, qkv, o, ffn_in, ffn_out, head",
        ),
        ({"lora.dropout": 1.5}, r"'lora.dropout': got 1.5, must be in \[0, 1\)"),
        ({"lora.bias": "some"}, r"'lora.bias'.*'none', 'lora_only', 'all'"),
        ({"train.use_fp16": True}, r"unknown config key 'train.use_fp16'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(BudgetLoraError, match=message):
        config_from_dict(BASE, overrides)


def test_override_parsing():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("lora.targets=[q, v]") == ("lora.targets", ["q", "v"])
    assert parse_override("train.max_steps=null") == ("train.max_steps", None)
    with pytest.raises(BudgetLoraError, match="expected KEY=VALUE"):
        parse_override("lora.r")


def test_load_resolves_data_paths_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text("data:\n  train_file: ../data/train.csv\nlora:\n  r: 2\n")
    monkeypatch.chdir(tmp_path / "configs")
    cfg = load_config(config, ["lora.r=4", "data.test_file=t.csv"])
    assert cfg.data.train_file == str(tmp_path / "data" / "train.csv")
    assert cfg.data.test_file == str(tmp_path / "configs" / "t.csv")  # overrides: relative to CWD
    assert cfg.lora.r == 4


def test_invalid_yaml_names_the_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  train_file: [unclosed\n")
    with pytest.raises(BudgetLoraError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(config)


def test_shipped_presets_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted(root.glob("*.yaml"))
    assert {p.name for p in presets} >= {"agnews-roberta-base.yaml", "agnews-minilm-offline.yaml"}
    for preset in presets:
        load_config(preset)
