"""Model cards in the Hugging Face Hub's format: YAML metadata (base model, datasets, library,
pipeline tag, tags, `model-index` results) and a body with the trainable count and its breakdown,
the test accuracy with its 95% interval, the config and how to load the model. One for each run
(`RUN/README.md`) and one for each export (`OUT/README.md`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from budgetlora import atomic
from budgetlora.artifacts.summary import RunSummary
from budgetlora.config import Config, config_yaml

# the hub ids of budgetlora's aliases, so a card (and an adapter config) names a model others can fetch
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
AGNEWS_HUB_ID = "fancyzhx/ag_news"


def base_model_id(cfg: Config) -> str:
    """The base model by its hub id or alias, never by a path on this machine."""
    if cfg.model in HUB_IDS:
        return HUB_IDS[cfg.model]
    path = Path(cfg.model).expanduser()
    return path.name if path.is_absolute() or cfg.model.startswith((".", "~")) or path.exists() else cfg.model


def dataset_id(cfg: Config, names: list[str]) -> Optional[str]:
    if cfg.data.dataset:
        return cfg.data.dataset
    if names == ["World", "Sports", "Business", "Sci/Tech"]:
        return AGNEWS_HUB_ID
    return None


def _metadata(cfg: Config, summary: Optional[RunSummary], names: list[str], library: str, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "base_model": base_model_id(cfg),
        "library_name": library,
        "pipeline_tag": "text-classification",
        "tags": ["budgetlora", "text-classification"] + (["lora", "peft"] if cfg.mode == "lora" else []),
    }
    dataset = dataset_id(cfg, names)
    if dataset:
        meta["datasets"] = [dataset]
    test = summary.test if summary is not None else None
    if test is not None:
        where = {
            "name": dataset or Path(cfg.data.test_file or "test").name,
            "type": dataset or "local",
            "split": cfg.data.test_split if cfg.data.dataset else "test",
        }
        meta["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "text-classification", "name": "Text Classification"},
                        "dataset": where,
                        "metrics": _index_metrics(test),
                    }
                ],
            }
        ]
    return meta


# model-index metric types (the Hub's evaluate names) of each task's scores
_INDEX_TYPES = {
    "macro_f1": ("f1", {"average": "macro"}),
    "micro_f1": ("f1", {"average": "micro"}),
    "subset_accuracy": ("accuracy", None),
    "jaccard": ("jaccard", {"average": "samples"}),
    "pearson": ("pearsonr", None),
    "spearman": ("spearmanr", None),
    "mae": ("mae", None),
    "rmse": ("rmse", None),
}


def _index_metrics(test: Any) -> list[dict[str, Any]]:
    """The test split's figures as model-index metrics, each with n and its 95% interval."""
    if test.task == "single_label":
        return [
            {
                "type": "accuracy",
                "value": round(test.accuracy, 4),
                "name": f"test accuracy (n={test.n}, 95% CI {test.ci_low:.4f}-{test.ci_high:.4f})",
            },
            {
                "type": "f1",
                "value": round(test.macro_f1, 4),
                "name": f"test macro-F1 (n={test.n})",
                "args": {"average": "macro"},
            },
        ]
    metrics = []
    for key, score in test.scores.items():
        kind, args = _INDEX_TYPES.get(key, (key, None))
        entry: dict[str, Any] = {
            "type": kind,
            "value": round(score.value, 4),
            "name": f"test {key.replace('_', '-')} (n={test.n}, 95% CI {score.low:.4f}-{score.high:.4f})",
        }
        if args:
            entry["args"] = args
        metrics.append(entry)
    return metrics


def _results(summary: Optional[RunSummary]) -> list[str]:
    if summary is None:
        return ["- the run this was exported from had not finished: no figures"]
    lines = []
    test = summary.test
    if test is not None and test.task == "single_label":
        lines.append(
            f"- test accuracy **{100 * test.accuracy:.2f}%** (95% Wilson interval "
            f"{100 * test.ci_low:.2f}-{100 * test.ci_high:.2f}, n = {test.n:,}), macro-F1 "
            f"{100 * test.macro_f1:.2f}"
        )
    elif test is not None:
        lines.append(f"- test {test.headline()} (95% bootstrap intervals)")
    if summary.best_val_acc is not None and summary.task == "single_label":
        lines.append(f"- best validation accuracy {100 * summary.best_val_acc:.2f}% at step {summary.best_step}")
    elif summary.best_val_acc is not None:
        what = summary.objective_name.replace("_", "-")
        lines.append(f"- best validation {what} {summary.best_val_acc:.4f} at step {summary.best_step}")
    lines.append(
        f"- trainable parameters **{summary.trainable_params:,}** of {summary.total_params:,}"
        + (f" (budget {summary.budget:,})" if summary.budget else "")
    )
    lines.append(
        f"- {summary.steps:,} steps, {summary.train_time_s:.0f} s of training on {summary.device} ({summary.precision})"
    )
    lines += ["", "| parameters | count |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in summary.breakdown.items()]
    return lines


def render_card(
    cfg: Config, summary: Optional[RunSummary], label_names: list[str], library: str, title: str, how_to_load: str
) -> str:
    meta = yaml.safe_dump(_metadata(cfg, summary, label_names, library, title), sort_keys=False, allow_unicode=True)
    names = ", ".join(label_names)
    body = [
        f"# {title}",
        "",
        f"A text classifier fine-tuned with [budgetlora](https://github.com/budgetlora/budgetlora) from "
        f"`{base_model_id(cfg)}` ({'LoRA' if cfg.mode == 'lora' else 'full fine-tuning'}, "
        f"head `{cfg.head.type}`{', ' + cfg.head.pooling + ' pooling' if cfg.head.type == 'linear' else ''}). "
        f"Classes: {names}.",
        "",
        "## Results",
        "",
        *_results(summary),
        "",
        "## How to load it",
        "",
        how_to_load.strip(),
        "",
        "## Config",
        "",
        "```yaml",
        config_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    return f"---\n{meta}---\n\n" + "\n".join(body)


def _peft_snippet(cfg: Config, names: list[str], run: str) -> str:
    base = base_model_id(cfg)
    if cfg.head.type == "linear":
        return f"""```python
import sys
from transformers import AutoConfig, AutoTokenizer
from peft import PeftModel

sys.path.insert(0, "{run}/adapter")  # modeling_budgetlora.py: the pooled head
from modeling_budgetlora import BudgetLoraPooledForSequenceClassification

config = AutoConfig.from_pretrained("{run}/adapter")  # the encoder's config + pooling + class names
base = BudgetLoraPooledForSequenceClassification.from_pretrained("{base}", config=config)
model = PeftModel.from_pretrained(base, "{run}/adapter").eval()
tokenizer = AutoTokenizer.from_pretrained("{run}/tokenizer")
```"""
    return f"""```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel

names = {names!r}
base = AutoModelForSequenceClassification.from_pretrained(
    "{base}", num_labels={len(names)}, id2label=dict(enumerate(names)), label2id={{n: i for i, n in enumerate(names)}})
model = PeftModel.from_pretrained(base, "{run}/adapter").eval()
tokenizer = AutoTokenizer.from_pretrained("{run}/tokenizer")
```"""


_RAW_ADAPTER = {
    "single_label": "The adapter is the raw model: divide its logits by `temperature` in `decisions.json` for "
    "the calibrated probabilities (the class, the argmax, is the same).",
    "multi_label": "The adapter is the raw model: a label is on when its sigmoid exceeds that label's threshold "
    "in `decisions.json` (`thresholds`), not 0.5.",
    "regression": "The adapter is the raw model: its outputs are standardised targets; multiply by `scale` and "
    "add `shift` from `decisions.json` for values in the targets' units.",
}


def _run_loading(cfg: Config, names: list[str]) -> str:
    lines = [
        "With budgetlora:",
        "",
        "```python",
        "import budgetlora",
        "",
        'run = budgetlora.load("RUN")  # this directory',
        'run.predict(["some text"]).labels',
        "```",
        "",
    ]
    if cfg.mode == "lora":
        lines += [
            "With plain Transformers + PEFT (no budgetlora), from the adapter in `adapter/` (`RUN` is this "
            "directory; the base model is fetched by its id):",
            "",
            _peft_snippet(cfg, names, "RUN"),
            "",
            _RAW_ADAPTER.get(cfg.task, ""),
            "",
            "`budgetlora export RUN --merged OUT` writes a model with the adapters folded in that "
            "`from_pretrained` and `pipeline` load directly.",
        ]
    return "\n".join(lines)


def write_run_card(run_dir: Path, cfg: Config, summary: RunSummary) -> None:
    """RUN/README.md (and the same card in RUN/adapter/, replacing PEFT's template)."""
    names = list(summary.label_names)
    text = render_card(
        cfg, summary, names, "peft" if cfg.mode == "lora" else "transformers", cfg.name, _run_loading(cfg, names)
    )
    from budgetlora.artifacts import run_dir as rd

    atomic.write_text(Path(run_dir) / rd.MODEL_CARD, text)
    if (Path(run_dir) / rd.ADAPTER).is_dir():
        atomic.write_text(Path(run_dir) / rd.ADAPTER / rd.MODEL_CARD, text)


def _export_loading(cfg: Config, kind: str) -> str:
    remote = ", trust_remote_code=True" if cfg.head.type == "linear" else ""
    why = (
        (
            "The head (mean or first-token pooling + one linear layer) is defined in `modeling_budgetlora.py` "
            "beside the weights, hence `trust_remote_code=True`.\n\n"
        )
        if remote
        else ""
    )
    if kind == "onnx":
        return """```python
import numpy as np, onnxruntime as ort
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("OUT")
session = ort.InferenceSession("OUT/model.onnx", providers=["CPUExecutionProvider"])
batch = tokenizer(["some text"], padding=True, truncation=True, return_tensors="np")  # pairs: tokenizer(firsts, seconds, ...)
logits = session.run(["logits"], {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()})[0]
```

or `budgetlora predict OUT --data FILE --out predictions.csv` (the onnxruntime backend)."""
    return (
        why
        + f"""```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

model = AutoModelForSequenceClassification.from_pretrained("OUT"{remote})
tokenizer = AutoTokenizer.from_pretrained("OUT")
classifier = pipeline("text-classification", model="OUT"{remote})
classifier("some text")
```

or `budgetlora predict OUT --data FILE --out predictions.csv`."""
    )


def write_export_card(out: Path, trained: Any, kind: str, int8: bool = False) -> None:
    from budgetlora.artifacts import run_dir as rd

    source = Path(trained.source)
    summary = rd.read_summary(source) if rd.is_finished(source) else None
    title = f"{trained.cfg.name} ({'ONNX' + (', int8' if int8 else '') if kind == 'onnx' else 'merged'})"
    library = "onnx" if kind == "onnx" else "transformers"
    text = render_card(
        trained.cfg, summary, list(trained.label_names), library, title, _export_loading(trained.cfg, kind)
    )
    if int8:
        text += (
            "\nThe weights are quantized to int8 (dynamic quantization, per channel): predictions can differ "
            "from the run's on a few percent of rows; the test accuracy above is the run's.\n"
        )
    atomic.write_text(Path(out) / "README.md", text)  # the Hub reads a model card from README.md
