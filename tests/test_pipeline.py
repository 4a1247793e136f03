"""End to end on a tiny random RoBERTa: train -> eval -> predict -> classify -> export -> reload,
and the bad-input paths of the CLI (one clear line, exit 2, nothing half-written)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from budgetlora.cli import main
from budgetlora.config import config_from_dict
from budgetlora.recipe import train_run


from helpers import tiny_config as _tiny_dict


def test_run_directory_contents(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "adapter",
        "labels.json",
        "tokenizer",
        "test_predictions.csv",
    } <= names
    assert {p.name for p in (trained_run / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["trainable_params"] == sum(summary["breakdown"].values())
    assert (
        summary["test"]["n"] == 120
        and summary["test"]["ci_low"] < summary["test"]["accuracy"] < summary["test"]["ci_high"]
    )
    assert summary["test"]["accuracy"] > 0.4  # random features, learnable topics; chance is 0.25
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train_loss" in r]
    assert train_steps == list(range(5, 61, 5))
    assert [r["step"] for r in records if "eval_acc" in r] == list(range(10, 61, 10))
    assert records[-1]["step"] == 60 and summary["best_val_acc"] == max(
        r["eval_acc"] for r in records if "eval_acc" in r
    )
    saved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["data"]["train_file"].endswith("train.csv")


def test_adapter_loads_with_plain_peft(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=4)
    model = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained_run / "tokenizer"))
    batch = tok(["stocks market shares profit", "match goal team coach"], return_tensors="pt", padding=True)
    with torch.no_grad():
        preds = model(**batch).logits.argmax(-1).tolist()
    assert preds == [2, 1]


def test_eval_predict_classify_export(trained_run, synthetic_data, tmp_path, capsys):
    assert (
        main(["eval", str(trained_run), "--data", str(synthetic_data["test"]), "--json", str(tmp_path / "m.json")]) == 0
    )
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert metrics["accuracy"] == summary["test"]["accuracy"] and "confusion matrix" in out
    assert np.array(metrics["confusion_matrix"]).sum() == 120

    unlabeled = tmp_path / "unlabeled.csv"
    with unlabeled.open("w", newline="") as handle:
        csv.writer(handle).writerows([["text"], ["stocks market shares profit"], ["match goal team coach"]])
    assert main(["predict", str(trained_run), "--data", str(unlabeled), "--out", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text() == "ID,Label\n0,2\n1,1\n"
    assert (
        main(["predict", str(trained_run), "--data", str(unlabeled), "--out", str(tmp_path / "n.csv"), "--names"]) == 0
    )
    assert (tmp_path / "n.csv").read_text().splitlines()[1:] == ["0,2", "1,1"]  # synthetic labels are 0..3

    capsys.readouterr()
    assert main(["classify", str(trained_run), "stocks market shares profit", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] == "2" and abs(sum(result["probabilities"].values()) - 1) < 1e-3

    merged = tmp_path / "merged"
    assert main(["export", str(trained_run), "--merged", str(merged)]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    tok = AutoTokenizer.from_pretrained(str(merged))
    import budgetlora

    adapter_model = budgetlora.load(trained_run, "cpu").trained.model
    texts = [line.split(",")[0] for line in synthetic_data["test"].read_text().splitlines()[1:40]]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        merged_logits = model(**batch).logits
        adapter_logits = adapter_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # the run's temperature (fitted on validation) is folded into the export's last layer
    temperature = json.loads((trained_run / "decisions.json").read_text())["temperature"]
    assert temperature != 1.0 and json.loads((merged / "config.json").read_text())["budgetlora_decisions"]["baked"]
    assert torch.allclose(merged_logits, adapter_logits / temperature, atol=1e-4)
    assert torch.equal(merged_logits.argmax(-1), adapter_logits.argmax(-1))


def test_training_is_seeded(tiny_model_dir, synthetic_data, tmp_path):
    raw = _tiny_dict(tiny_model_dir, synthetic_data)
    raw["train"].update(max_steps=10, eval_every=None)
    raw["lora"]["dropout"] = 0.1
    a = train_run(config_from_dict(raw), tmp_path, verbose=False)
    b = train_run(config_from_dict(raw), tmp_path, verbose=False)
    assert b.name == "tiny-2"  # a rerun never clobbers the first run

    def trajectory(run):  # every logged number but the throughput, which depends on the machine's load
        return [
            {k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert len(trajectory(a)) == 2 and trajectory(a) == trajectory(b)
    from safetensors.torch import load_file

    wa, wb = (
        load_file(str(a / "adapter/adapter_model.safetensors")),
        load_file(str(b / "adapter/adapter_model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"lora": {"targets": ["q", "query"]}},
            "unknown target(s) ['query']; valid: q, k, v, qkv, o, ffn_in, ffn_out, head",
        ),
        ({"model": "someone/not-downloaded-model"}, "is not available offline"),
        ({"data": {"train_file": "MISSING"}}, "data file not found"),
        ({"lora": {"r": 4096, "targets": ["q", "k", "v", "o", "ffn_in", "ffn_out"]}}, "exceed the budget"),
        ({"lora": {"layers": [0, 5]}}, "'lora.layers': [0, 5] outside 0..1"),
    ],
)
def test_bad_input_one_line_no_run_dir(tiny_model_dir, synthetic_data, tmp_path, capsys, change, message):
    raw = _tiny_dict(tiny_model_dir, synthetic_data)
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    if raw["data"]["train_file"] == "MISSING":
        raw["data"]["train_file"] = str(tmp_path / "missing.csv")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["train", str(config), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("budgetlora: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_predict_refuses_pickle_without_opt_in(trained_run, tmp_path, capsys):
    import pickle

    path = tmp_path / "test_unlabelled.pkl"
    path.write_bytes(pickle.dumps({"text": ["match goal"]}))
    code = main(["predict", str(trained_run), "--data", str(path), "--out", str(tmp_path / "p.csv")])
    assert code == 2 and "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    assert (
        main(["predict", str(trained_run), "--data", str(path), "--out", str(tmp_path / "p.csv"), "--trust-pickle"])
        == 0
    )
    assert (tmp_path / "p.csv").read_text().startswith("ID,Label\n0,")


def test_every_trainable_tensor_gets_a_gradient(tiny_model_dir):
    """The first backward step is checked; a detached adapter is an error, not a silent no-op."""
    from budgetlora.errors import BudgetLoraError
    from budgetlora.training.loop import check_gradients_flow

    layer = torch.nn.Linear(2, 2)
    frozen_branch = torch.nn.Linear(2, 2)
    layer(torch.ones(1, 2)).sum().backward()
    check_gradients_flow(layer)
    with pytest.raises(BudgetLoraError, match="received no gradient"):
        check_gradients_flow(torch.nn.ModuleList([layer, frozen_branch]))


@pytest.mark.parametrize("head", [{"type": "auto"}, {"type": "linear", "pooling": "mean"}])
def test_full_fine_tuning_trains_every_parameter_and_reloads(tiny_model_dir, synthetic_data, tmp_path, head):
    raw = _tiny_dict(tiny_model_dir, synthetic_data)
    raw.update(mode="full", budget=None, head=head)
    raw["train"].update(max_steps=6, eval_every=3, lr=1e-3)
    run = train_run(config_from_dict(raw), tmp_path, verbose=False)
    summary = json.loads((run / "summary.json").read_text())
    # every parameter trains: a linear head drops the encoder's unused pooler instead of leaving
    # it trainable without a gradient
    assert summary["mode"] == "full" and summary["trainable_params"] == summary["total_params"]
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    assert main(["eval", str(run), "--data", str(synthetic_data["test"]), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == summary["test"]["accuracy"]
