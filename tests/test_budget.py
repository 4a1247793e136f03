"""Exact trainable-parameter counts on the roberta-base architecture (random init, no download)."""

from __future__ import annotations

import pytest

from budgetlora.model import count_trainable, max_rank
from budgetlora.cli import main
from budgetlora.config import config_from_dict
from budgetlora.errors import OverBudgetError
from budgetlora.model import build_meta_model
from budgetlora.model import precheck_budget


def roberta(**lora) -> "object":
    return config_from_dict({"model": "roberta-base", "data": {"train_file": "unused.csv"}, "lora": lora})


@pytest.mark.parametrize(
    "lora, expected",
    [
        ({"r": 2, "targets": ["q", "v"]}, 667_396),
        ({"r": 1, "targets": ["q", "k", "v", "o"], "bias": "lora_only"}, 704_260),
        ({"r": 22, "targets": ["v"]}, 999_172),
        ({"r": 8, "targets": ["q", "v"]}, 888_580),
    ],
)
def test_roberta_base_counts(lora, expected):
    assert count_trainable(build_meta_model(roberta(**lora), 4)).trainable == expected


def test_head_alone_and_breakdown():
    report = count_trainable(build_meta_model(roberta(r=2, targets=["q", "v"]), 4))
    assert report.breakdown == {
        "head": 593_668,
        "lora_A.q": 18_432,
        "lora_A.v": 18_432,
        "lora_B.q": 18_432,
        "lora_B.v": 18_432,
    }


@pytest.mark.parametrize("targets", [["v"], ["q", "v"], ["q", "k", "v", "o"]])
def test_bias_all_adds_every_base_bias(targets):
    none = count_trainable(build_meta_model(roberta(r=2, targets=targets), 4)).trainable
    every = count_trainable(build_meta_model(roberta(r=2, targets=targets, bias="all"), 4)).trainable
    assert every - none == 102_144


def test_ffn_out_is_not_confused_with_attention_output():
    """`output.dense` suffix-matches both; short names map to exact paths."""
    o = count_trainable(build_meta_model(roberta(r=1, targets=["o"]), 4)).breakdown
    ffn_out = count_trainable(build_meta_model(roberta(r=1, targets=["ffn_out"]), 4)).breakdown
    assert o["lora_A.o"] == 12 * 768 and "lora_A.ffn_out" not in o
    assert ffn_out["lora_A.ffn_out"] == 12 * 3072 and "lora_A.o" not in ffn_out


def test_layers_and_rank_pattern_are_counted_from_the_model():
    only_top = count_trainable(build_meta_model(roberta(r=4, targets=["v"], layers=[10, 11]), 4))
    assert only_top.trainable == 593_668 + 2 * 4 * (768 + 768)
    patterned = count_trainable(
        build_meta_model(roberta(r=4, targets=["v"], rank_pattern={"layer.11.attention.self.value": 16}), 4)
    )
    assert patterned.trainable == 593_668 + 11 * 4 * 1536 + 16 * 1536


@pytest.mark.parametrize("targets, rank", [(["v"], 22), (["q", "v"], 11), (["k", "o"], 11), (["q", "k", "v"], 7)])
def test_planner_largest_rank(targets, rank):
    r, count = max_rank(roberta(targets=targets), 4, 1_000_000)
    assert r == rank and count <= 1_000_000
    assert max_rank(roberta(targets=targets), 4, count - 1)[0] == rank - 1


def test_plan_cli_prints_rank_and_count(capsys):
    assert main(["plan", "--model", "roberta-base", "--budget", "1000000", "--targets", "v"]) == 0
    out = capsys.readouterr().out
    assert "r=22" in out and "999,172" in out


def test_over_budget_is_refused_before_data_is_read(tmp_path):
    cfg = config_from_dict(
        {
            "model": "roberta-base",
            "data": {"train_file": str(tmp_path / "missing.csv")},
            "lora": {"r": 64, "targets": ["q", "k", "v"]},
        }
    )
    with pytest.raises(OverBudgetError, match=r"largest rank that fits .* r=7"):
        precheck_budget(cfg)


def test_over_budget_train_cli_exits_cleanly(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: roberta-base\ndata: {train_file: missing.csv}\nlora: {r: 64, targets: [q, k, v]}\n")
    code = main(["train", str(config), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("budgetlora: error:") and "exceed the budget" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
