"""The Python API, as a notebook uses it: train with overrides, load, evaluate, predict, export,
plan, sweep; the same validation and errors as the CLI, raised (never an exit)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import budgetlora
from budgetlora.errors import BudgetLoraError


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_with_nested_and_dotted_overrides_lands_where_the_cli_puts_runs(tiny_config, in_tmp):
    path = in_tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    run = budgetlora.train(path, train={"max_steps": 6, "eval_every": 3}, quiet=True, **{"lora.r": 2})
    assert run.path == in_tmp / "runs" / "tiny" and run.kind == "run"
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 6 and cfg["lora"]["r"] == 2 and cfg["train"]["lr"] == tiny_config["train"]["lr"]
    assert run.summary.steps == 6 and run.label_names == ["0", "1", "2", "3"]
    assert run.summary.to_json()["steps"] == 6 and run.summary.test.n == 120
    again = budgetlora.train(tiny_config, name="second", quiet=True, train={"max_steps": 2, "eval_every": None})
    assert again.path == in_tmp / "runs" / "second"


def test_predict_evaluate_export_and_load(trained_run, synthetic_data, tmp_path):
    run = budgetlora.load(trained_run)
    one = run.predict("stocks market shares profit")
    many = run.predict(["stocks market shares profit", "match goal team coach"])
    assert (
        one.labels == ["2"]
        and many.labels == ["2", "1"]
        and many.texts == ["stocks market shares profit", "match goal team coach"]
    )
    assert np.allclose(many.probabilities.sum(1), 1) and many.records()[0]["probabilities"]["2"] > 0.25
    from_file = run.predict(synthetic_data["test"])  # a labeled file predicts too; ids are row numbers
    assert len(from_file) == 120 and from_file.ids[:2] == ["0", "1"]
    metrics = run.evaluate(synthetic_data["test"])
    summary = json.loads((trained_run / "summary.json").read_text())
    assert metrics["accuracy"] == summary["test"]["accuracy"] and metrics["n"] == 120
    assert from_file.to_csv(tmp_path / "p.csv", names=True).read_text().startswith("ID,Label\n0,")
    export = budgetlora.load(run.export(tmp_path / "export"))
    assert export.kind == "merged" and export.summary is None
    assert export.predict(["stocks market shares profit"]).labels == ["2"]


def test_errors_are_raised_not_exits(tiny_config, trained_run, tmp_path, in_tmp):
    with pytest.raises(BudgetLoraError, match="'train.lr': got -1.0, must be in"):
        budgetlora.train(tiny_config, train={"lr": -1}, quiet=True)
    with pytest.raises(BudgetLoraError, match="run or export directory not found"):
        budgetlora.load(tmp_path / "nope")
    with pytest.raises(BudgetLoraError, match="empty text"):
        budgetlora.load(trained_run).predict([" "])
    with pytest.raises(BudgetLoraError, match="is an export already"):
        budgetlora.load(budgetlora.load(trained_run).export(tmp_path / "e")).export(tmp_path / "e2")
    with pytest.raises(BudgetLoraError, match="unknown option"):
        budgetlora.sweep(tmp_path / "study.yaml", no_such_option=True)
    assert not (in_tmp / "runs").exists()


def test_plan_from_the_architecture_alone():
    plan = budgetlora.plan("roberta-base", 1_000_000, ["q", "v"])
    assert (plan.rank, plan.trainable) == (11, 999_172) and plan.breakdown["head"] == 593_668
    assert "trainable" in plan.table()
    assert budgetlora.plan("roberta-base", 500_000, ["q", "v"]).rank == 0


@pytest.mark.slow
def test_sweep_from_python(tiny_config, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**tiny_config, "train": {**tiny_config["train"], "max_steps": 4, "eval_every": 4}}))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"lora.r": [1, 2]}}))
    outcome = budgetlora.sweep(study, tmp_path / "out", quiet=True, heartbeat=None)
    assert outcome.stats.trained == 2 and (tmp_path / "out" / "best.yaml").is_file()
    assert any(line.startswith("## Verdict") for line in "\n".join(outcome.lines).splitlines())
