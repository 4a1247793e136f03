"""A budgetlora export's answers as a plain user gets them: Transformers (the model and its
pipeline) or ONNX Runtime, in a process that never imports budgetlora. The decisions tuned on
validation are in the export's last layer, so the plain answers are the raw ones: argmax
(single-label), every label whose output is > 0, i.e. whose sigmoid is > 0.5 (multi-label), the
outputs themselves (regression).

    python scripts/plain_decisions.py EXPORT DATA.csv --columns text [--columns-pair sentence2] \
        --max-length 128 --out answers.json

Writes {"route": ..., "problem_type": ..., "answers": [...], "budgetlora_imported": false}; the
texts are read from the CSV as they are (budgetlora's own clean_text must be off for the run, as
in the task presets, or the inputs would differ).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def read_texts(path: Path, column: str, pair: str | None) -> tuple[list[str], list[str] | None]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    first = [row[column].strip() for row in rows]
    return first, [row[pair].strip() for row in rows] if pair else None


def answers_of(problem_type: str, outputs: np.ndarray) -> list:
    if problem_type == "multi_label_classification":
        return [np.flatnonzero(row > 0).tolist() for row in outputs]
    if problem_type == "regression":
        return outputs.tolist()
    return outputs.argmax(1).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("data")
    parser.add_argument("--columns", required=True, help="the text column")
    parser.add_argument("--columns-pair", help="the second text column of a pair")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    export = Path(args.export)
    config = json.loads((export / "config.json").read_text())
    problem_type = config.get("problem_type") or "single_label_classification"
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    segments = "token_type_ids" in tokenizer.model_input_names
    first, second = read_texts(Path(args.data), args.columns, args.columns_pair)
    outputs, pipeline_answers = [], None
    onnx = (export / "model.onnx").is_file()
    if onnx:
        import onnxruntime as ort

        session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
    else:
        import torch
        from transformers import AutoModelForSequenceClassification, pipeline

        remote = {"trust_remote_code": True} if config.get("auto_map") else {}
        model = AutoModelForSequenceClassification.from_pretrained(str(export), **remote).eval()
    for start in range(0, len(first), args.batch):
        pair = second[start : start + args.batch] if second else None
        batch = tokenizer(
            first[start : start + args.batch],
            pair,
            padding=True,
            truncation=True,
            max_length=args.max_length,
            return_tensors="np" if onnx else "pt",
            return_token_type_ids=bool(pair) and segments,
        )
        if onnx:
            feed = {k: v.astype(np.int64) for k, v in batch.items() if k in wanted}
            outputs.append(session.run(["logits"], feed)[0])
        else:
            with torch.no_grad():
                outputs.append(model(**batch).logits.float().numpy())
    if not onnx and not second:
        clf = pipeline("text-classification", model=str(export), top_k=None, **remote)
        scored = clf(first, batch_size=args.batch, truncation=True, max_length=args.max_length)
        order = {name: int(i) for i, name in config["id2label"].items()}
        scores = np.array([[s["score"] for s in sorted(row, key=lambda s: order[s["label"]])] for row in scored])
        # the pipeline's own function by problem_type: softmax, sigmoid (> 0.5 is a label), none
        if problem_type == "multi_label_classification":
            pipeline_answers = [np.flatnonzero(row > 0.5).tolist() for row in scores]
        elif problem_type == "regression":
            pipeline_answers = scores.tolist()
        else:
            pipeline_answers = scores.argmax(1).tolist()
    result = {
        "route": "onnxruntime" if onnx else "transformers",
        "problem_type": problem_type,
        "answers": answers_of(problem_type, np.concatenate(outputs)),
        "pipeline_answers": pipeline_answers,
        "budgetlora_imported": any(m == "budgetlora" or m.startswith("budgetlora.") for m in sys.modules),
    }
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
