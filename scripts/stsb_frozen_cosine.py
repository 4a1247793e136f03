"""The baseline a fine-tuned STS-B model must beat on the packaged encoder: all-MiniLM-L6-v2 was
itself trained on sentence-similarity data, so its frozen embeddings' cosine similarity already
ranks STS-B pairs. Prints Spearman and Pearson (x100) on a split, with the bootstrap 95% interval
budgetlora reports for its own runs; given a run trained on STS-B, also the paired bootstrap p-value
of the Spearman difference on the same rows (the run's test_predictions.csv, in file order).

    python scripts/stsb_frozen_cosine.py ../shared/data/stsb/test.csv [RUN]
"""

from __future__ import annotations

import csv
import sys

import numpy as np
import torch


def main(path: str, run: str | None = None) -> int:
    from transformers import AutoModel, AutoTokenizer

    from budgetlora.evaluate.task_metrics import regression_metrics
    from budgetlora.model import resolve_model_path

    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    name = resolve_model_path("minilm")
    tokenizer, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()

    def embed(texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), 64):
            batch = tokenizer(
                texts[start : start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            with torch.no_grad():
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    a, b = embed([r["sentence1"] for r in rows]), embed([r["sentence2"] for r in rows])
    cosine = (a * b).sum(-1).numpy()
    truth = np.array([float(r["score"]) for r in rows])
    metrics = regression_metrics(truth, cosine, ["score"])
    for key in ("spearman", "pearson"):
        s = metrics["scores"][key]
        print(f"{key} {100 * s['value']:.2f} (95% CI {100 * s['low']:.2f}-{100 * s['high']:.2f}), n={len(rows):,}")
    if run:
        from budgetlora.evaluate.task_metrics import paired_bootstrap_pvalue, regression_scores

        cells = list(csv.DictReader(open(f"{run}/test_predictions.csv", newline="", encoding="utf-8")))
        if [int(c["ID"]) for c in cells] != list(range(len(rows))):
            raise SystemExit(f"{run}/test_predictions.csv does not hold this file's rows in order")
        fine = np.array([float(c["pred"]) for c in cells])
        p = paired_bootstrap_pvalue(truth, fine, cosine, "regression")
        gap = regression_scores(truth, fine)["spearman"] - regression_scores(truth, cosine)["spearman"]
        print(f"run {run}: Spearman {100 * gap:+.2f} points vs the frozen cosine, paired bootstrap p = {p:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
