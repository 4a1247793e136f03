"""`train.report_to: [tensorboard]`: the numbers of metrics.jsonl as TensorBoard scalars, continued without
duplicates on resume, and a clear error before any work when the package is missing."""

from __future__ import annotations

import builtins
import json

import pytest

from budgetlora.config import config_from_dict
from budgetlora.errors import BudgetLoraError
from budgetlora.recipe import train_run
from budgetlora.resuming import resume_run

pytest.importorskip("tensorboard")  # a dev dependency: installed by scripts/setup


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_mirror_metrics_jsonl_and_resume_without_duplicates(tiny_config, tmp_path):
    tiny_config["train"].update({"max_steps": 20, "report_to": ["tensorboard"], "save_every": 10})
    run = train_run(config_from_dict(tiny_config), tmp_path / "runs", verbose=False)
    resume_run(run, extend=True, overrides=["train.max_steps=30"], verbose=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(run / "tensorboard")
    assert {"train/loss", "train/acc", "eval/loss", "eval/acc", "lr", "samples_per_s"} <= set(scalars)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    assert [s for s, _ in train] == list(range(5, 31, 5))
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in train]  # no step twice after resume
    for (_, logged), (_, event) in zip(train, scalars["train/loss"], strict=True):
        assert event == pytest.approx(logged, rel=1e-6)
    assert [s for s, _ in scalars["eval/acc"]] == [r["step"] for r in records if "eval_acc" in r]


def test_missing_tensorboard_is_refused_before_a_run_directory_exists(tiny_config, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    tiny_config["train"]["report_to"] = ["tensorboard"]
    with pytest.raises(BudgetLoraError, match="train.report_to.*pip install"):
        train_run(config_from_dict(tiny_config), tmp_path / "runs", verbose=False)
    assert not (tmp_path / "runs").exists()


def test_mlflow_logs_params_metrics_per_step_and_the_run_directory(tiny_config, tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny_config["train"].update(
        {
            "max_steps": 10,
            "eval_every": 5,
            "log_every": 5,
            "save_every": 5,
            "report_to": ["mlflow"],
            "mlflow_tracking_uri": uri,
            "mlflow_experiment": "tests",
        }
    )
    run = train_run(config_from_dict(tiny_config), tmp_path / "runs", verbose=False)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == "tiny"
    assert logged.data.params["lora.r"] == "4" and logged.data.params["train.lr"] == str(tiny_config["train"]["lr"])
    losses = client.get_metric_history(logged.info.run_id, "train_loss")
    assert [m.step for m in losses] == [5, 10]
    summary = json.loads((run / "summary.json").read_text())
    assert logged.data.metrics["test.accuracy"] == pytest.approx(summary["test"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"summary.json", "config.yaml", "metrics.jsonl", "adapter", "README.md"} <= artifacts
    assert "checkpoints" not in artifacts
