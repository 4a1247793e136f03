"""Problem types beyond one label per text: multi-label sets with thresholds tuned on validation,
regression (standardised targets, answers in the targets' units), text pairs (the tokenizer's pair
with segment ids), imbalance tools (class weights, focal loss), temperature calibration, and the
metrics of each; exports that answer like the run in a process that never imports budgetlora."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import budgetlora
from budgetlora.errors import BudgetLoraError
from helpers import multi_label_rows, pair_rows, regression_rows, task_config, write_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task-data")
    return {
        "multi_train": write_rows(root / "multi_train.csv", ["text", "labels"], multi_label_rows(400, 1)),
        "multi_test": write_rows(root / "multi_test.csv", ["text", "labels"], multi_label_rows(120, 2)),
        "reg_train": write_rows(root / "reg_train.csv", ["text", "score", "cost"], regression_rows(400, 1)),
        "reg_test": write_rows(root / "reg_test.csv", ["text", "score", "cost"], regression_rows(120, 2)),
        "pair_train": write_rows(root / "pair_train.csv", ["s1", "s2", "label"], pair_rows(400, 1)),
        "pair_test": write_rows(root / "pair_test.csv", ["s1", "s2", "label"], pair_rows(120, 2)),
    }


def _train(cfg: dict, out: Path) -> budgetlora.Run:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(out / "cache"))
        return budgetlora.train(cfg, out=out / "runs", quiet=True)


@pytest.fixture(scope="module")
def multi_run(tiny_bert_dir, task_data, tmp_path_factory) -> budgetlora.Run:
    cfg = task_config(
        tiny_bert_dir,
        task_data["multi_train"],
        task_data["multi_test"],
        name="multi",
        task="multi_label",
        data={"label_column": "labels", "val_size": 100},
        train={"max_steps": 80, "eval_every": 40},
    )
    return _train(cfg, tmp_path_factory.mktemp("multi"))


@pytest.fixture(scope="module")
def regression_run(tiny_bert_dir, task_data, tmp_path_factory) -> budgetlora.Run:
    cfg = task_config(
        tiny_bert_dir,
        task_data["reg_train"],
        task_data["reg_test"],
        name="reg",
        task="regression",
        data={"label_columns": ["score", "cost"], "val_size": 80},
        train={"max_steps": 80, "eval_every": 40},
    )
    return _train(cfg, tmp_path_factory.mktemp("reg"))


@pytest.fixture(scope="module")
def pair_run(tiny_bert_dir, task_data, tmp_path_factory) -> budgetlora.Run:
    cfg = task_config(
        tiny_bert_dir,
        task_data["pair_train"],
        task_data["pair_test"],
        name="pair",
        data={"text_pair_columns": ["s1", "s2"], "val_size": 80},
        train={"max_steps": 80, "eval_every": 40},
    )
    return _train(cfg, tmp_path_factory.mktemp("pair"))


def _prediction_cells(run: budgetlora.Run, name: str = "test_predictions.csv") -> list[dict[str, str]]:
    with open(run.path / name, newline="") as handle:
        return list(csv.DictReader(handle))


# multi-label -------------------------------------------------------------------------------------


def test_a_multi_label_run_tunes_a_threshold_per_label_and_scores_the_sets(multi_run):
    summary = multi_run.summary
    assert summary.task == "multi_label" and summary.label_names == ["business", "sports", "tech", "world"]
    test = summary.test
    assert test.task == "multi_label" and test.n == 120
    for name in ("macro_f1", "micro_f1", "subset_accuracy", "jaccard"):
        score = test.scores[name]
        assert score.low <= score.value <= score.high
    assert test.macro_f1 == pytest.approx(test.scores["macro_f1"].value)
    assert test.objective.value == test.scores["macro_f1"].value
    assert test.scores["macro_f1"].value > 0.5  # the words name the labels: it learns them
    decisions = json.loads((multi_run.path / "decisions.json").read_text())
    assert decisions["task"] == "multi_label" and len(decisions["thresholds"]) == 4
    assert all(0.01 <= t <= 0.99 for t in decisions["thresholds"]) and all(decisions["tuned"])
    # the predictions file holds label indices joined by spaces; its rows are the test rows
    cells = _prediction_cells(multi_run)
    assert len(cells) == 120 and all(set(c["pred"].split()) <= {"0", "1", "2", "3"} for c in cells)
    exact = np.mean([c["label"] == c["pred"] for c in cells])
    assert exact == pytest.approx(test.accuracy)


def test_multi_label_eval_predict_classify_and_a_global_threshold(multi_run, task_data, tmp_path, capsys):
    metrics = multi_run.evaluate(task_data["multi_test"])
    assert metrics["scores"]["macro_f1"]["value"] == pytest.approx(multi_run.summary.test.macro_f1)
    loose = multi_run.evaluate(task_data["multi_test"], threshold=0.05)
    assert loose["scores"]["micro_f1"]["value"] != metrics["scores"]["micro_f1"]["value"]
    recall = np.mean([row["recall"] for row in loose["per_class"].values()])
    assert recall >= np.mean([row["recall"] for row in metrics["per_class"].values()])  # a low threshold: more labels
    predictions = multi_run.predict(task_data["multi_test"])
    out = predictions.to_csv(tmp_path / "p.csv", probabilities=True, separator="|")
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[0]) == ["ID", "Labels", "p:business", "p:sports", "p:tech", "p:world"]
    answers = [set(r["Labels"].split("|")) - {""} for r in rows]
    assert answers == [set(labels) for labels in predictions.labels]
    assert all(0 <= float(r["p:sports"]) <= 1 for r in rows)
    with pytest.raises(BudgetLoraError, match="no single class per row"):
        _ = predictions.indices
    from budgetlora.cli import main

    assert main(["classify", str(multi_run.path), "match goal coach stocks market profit"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert {"sports", "business"} <= set(line.split("\t")[0].split(","))


# regression ---------------------------------------------------------------------------------------


def test_a_regression_run_learns_standardised_targets_and_answers_in_their_units(regression_run, task_data):
    summary = regression_run.summary
    assert summary.task == "regression" and summary.label_names == ["score", "cost"]
    space = json.loads((regression_run.path / "labels.json").read_text())
    assert space["task"] == "regression" and len(space["target_mean"]) == 2 and min(space["target_std"]) > 0
    test = summary.test
    assert test.accuracy is None and test.scores["spearman"].value > 0.5
    assert set(test.per_target) == {"score", "cost"}
    predictions = regression_run.predict(task_data["reg_test"])
    values = np.asarray(predictions.labels)
    assert values.shape == (120, 2)
    # in the targets' own units: scores 1-3, costs 6-10 (not standardised values around 0)
    assert 1.5 < values[:, 0].mean() < 2.5 and 7 < values[:, 1].mean() < 9
    metrics = regression_run.evaluate(task_data["reg_test"])
    assert metrics["scores"]["spearman"]["value"] == pytest.approx(test.scores["spearman"].value)


def test_regression_predictions_file_has_a_column_per_target(regression_run, task_data, tmp_path):
    out = regression_run.predict(task_data["reg_test"]).to_csv(tmp_path / "scores.csv")
    rows = list(csv.DictReader(open(out, newline="")))
    assert list(rows[0]) == ["ID", "score", "cost"] and len(rows) == 120
    assert all(math.isfinite(float(r["cost"])) for r in rows)


# text pairs ---------------------------------------------------------------------------------------


def test_text_pairs_are_encoded_as_the_tokenizers_pair_with_segment_ids(tiny_bert_dir, tiny_model_dir, tmp_path):
    from budgetlora.data.tokens import collate, tokenize
    from budgetlora.model import load_tokenizer

    bert = load_tokenizer(str(tiny_bert_dir))
    pair = tokenize(bert, ["match goal"], None, 64, use_cache=False, pairs=["stocks market"], segments=True)
    joined = tokenize(bert, ["match goal stocks market"], None, 64, use_cache=False)
    assert pair.segments is not None and pair.segments.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert len(pair.ids) == len(joined.ids) + 1  # a separator between the two texts
    batch = collate(pair, np.array([0]), 0)
    assert batch["token_type_ids"].tolist()[0][:7] == [0, 0, 0, 0, 1, 1, 1]
    roberta = load_tokenizer(str(tiny_model_dir))  # no segment ids: the pair is separators only
    assert tokenize(roberta, ["match"], None, 64, use_cache=False, pairs=["goal"], segments=True).segments is None
    # a model without segment embeddings gets none (the recipe asks model.takes_segments)
    assert tokenize(bert, ["match"], None, 64, use_cache=False, pairs=["goal"]).segments is None
    # the longer side is cut first
    long = tokenize(bert, ["match " * 50], None, 16, use_cache=False, pairs=["stocks market"], segments=True)
    assert long.lengths.tolist() == [16] and long.segments[-3:].tolist() == [1, 1, 1]


def test_a_pair_run_predicts_from_files_tuples_and_tab_lines(pair_run, task_data, capsys):
    assert pair_run.summary.test.accuracy > 0.6
    assert pair_run.summary.test.calibration is not None  # single-label: a temperature, ECE before/after
    from_file = pair_run.predict(task_data["pair_test"])
    assert len(from_file) == 120
    tuples = pair_run.predict([("match goal team coach", "league player season goal")])
    tabbed = pair_run.predict(["match goal team coach\tleague player season goal"])
    assert tuples.labels == tabbed.labels and np.allclose(tuples.probabilities, tabbed.probabilities)
    with pytest.raises(BudgetLoraError, match="reads text pairs"):
        pair_run.predict(["only one text"])
    from budgetlora.cli import main

    assert main(["classify", str(pair_run.path), "match goal", "--pair", "team coach"]) == 0
    assert capsys.readouterr().out.strip().endswith("match goal")
    assert main(["classify", str(pair_run.path), "a", "b", "--pair", "c"]) == 2
    assert "one --pair per text" in capsys.readouterr().err


# losses, weights, calibration, metrics (no training) ------------------------------------------------


def test_focal_loss_at_gamma_zero_is_cross_entropy_and_weights_follow_the_classes():
    import torch

    from budgetlora.config import TrainConfig
    from budgetlora.training.losses import BinaryLoss, FocalLoss, class_weights, loss_function

    logits, labels = (
        torch.randn(8, 3, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1, 2, 0, 1, 2, 0, 0]),
    )
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(FocalLoss(0.0, None)(logits, labels), ce)
    assert FocalLoss(2.0, None)(logits, labels) < ce  # easy rows count less
    names = ["a", "b", "c"]
    balanced = class_weights(TrainConfig(class_weights="balanced"), "single_label", names, labels.numpy())
    assert balanced.tolist() == pytest.approx([8 / (3 * 4), 8 / (3 * 2), 8 / (3 * 2)])
    given = class_weights(TrainConfig(class_weights={"c": 3.0}), "single_label", names, labels.numpy())
    assert given.tolist() == [1.0, 1.0, 3.0]
    with pytest.raises(BudgetLoraError, match="unknown class"):
        class_weights(TrainConfig(class_weights={"z": 2.0}), "single_label", names, labels.numpy())
    multi = np.array([[1, 0], [0, 0], [0, 0], [1, 1]], dtype=np.float32)
    pos = class_weights(TrainConfig(class_weights="balanced"), "multi_label", ["x", "y"], multi)
    assert pos.tolist() == [1.0, 3.0]  # negatives / positives, at least 1
    assert isinstance(loss_function(TrainConfig(loss="focal"), "multi_label"), BinaryLoss)
    assert isinstance(loss_function(TrainConfig(loss="huber"), "regression"), torch.nn.HuberLoss)


def test_temperature_scaling_calibrates_an_overconfident_model():
    from budgetlora.evaluate.calibration import expected_calibration_error, fit_temperature
    from budgetlora.task import softmax

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    logits = rng.normal(size=(2000, 4))
    logits[np.arange(2000), labels] += 1.5  # right about 70% of the time ...
    logits *= 4  # ... and far too sure of itself
    temperature = fit_temperature(logits, labels)
    assert 2.5 < temperature < 6
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits / temperature), labels)
    assert after < before / 3


def test_thresholds_are_tuned_per_label_and_rare_labels_share_one():
    from budgetlora.evaluate.calibration import MIN_POSITIVES, tune_thresholds

    rng = np.random.default_rng(1)
    truth = np.zeros((400, 3), dtype=bool)
    truth[:200, 0] = True
    truth[:100, 1] = True
    truth[:2, 2] = True  # too rare to tune
    probabilities = rng.uniform(0, 0.25, size=(400, 3))
    probabilities[:200, 0] += 0.5  # label 0: positives above 0.5
    probabilities[:100, 1] = rng.uniform(0.3, 0.4, 100)  # label 1: positives at 0.3-0.4, negatives below 0.25
    thresholds, tuned, notes = tune_thresholds(probabilities, truth, ["a", "b", "c"])
    assert tuned == (True, True, False) and 2 < MIN_POSITIVES
    assert 0.25 <= thresholds[0] < 0.5 and 0.25 <= thresholds[1] < 0.3
    assert len(notes) == 1 and "c (2)" in notes[0]


def test_multi_label_and_regression_metrics_match_hand_counts():
    from budgetlora.evaluate.task_metrics import multilabel_metrics, regression_metrics

    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=bool)
    pred = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    m = multilabel_metrics(truth, pred, ["a", "b"])
    # a: tp 2, fp 0, fn 0 -> F1 1; b: tp 1, fp 1, fn 1 -> F1 0.5; micro: tp 3, fp 1, fn 1 -> 0.75
    assert m["scores"]["macro_f1"]["value"] == pytest.approx(0.75)
    assert m["scores"]["micro_f1"]["value"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.5) and m["correct"] == 2
    assert m["scores"]["jaccard"]["value"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    r = regression_metrics(np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 3, 5]), ["y"])
    assert r["scores"]["spearman"]["value"] == pytest.approx(1.0)
    flat = regression_metrics(np.array([1.0, 2, 3, 4]), np.full(4, 2.5), ["y"])  # a collapsed model
    assert flat["scores"]["pearson"]["value"] == flat["scores"]["spearman"]["value"] == 0.0
    assert r["scores"]["mae"]["value"] == pytest.approx(0.25)
    assert r["scores"]["rmse"]["value"] == pytest.approx(0.5)


# exports answer like the run, read by a process that never imports budgetlora -----------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["multi", "regression"])
def test_merged_and_onnx_exports_reproduce_the_runs_decisions_in_plain_processes(
    which, multi_run, regression_run, task_data, tmp_path
):
    pytest.importorskip("onnxruntime")
    run = multi_run if which == "multi" else regression_run
    test_file = task_data["multi_test" if which == "multi" else "reg_test"]
    ours = run.predict(test_file)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    env.pop("PYTHONPATH", None)
    for kind in ("merged", "onnx"):
        export = run.export(tmp_path / kind, onnx=kind == "onnx")
        out = tmp_path / f"{kind}.json"
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "plain_decisions.py"), str(export), str(test_file)]
            + ["--columns", "text", "--max-length", "64", "--out", str(out)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        plain = json.loads(out.read_text())
        assert not plain["budgetlora_imported"]
        routes = [plain["answers"]] + ([plain["pipeline_answers"]] if plain["pipeline_answers"] else [])
        for answers in routes:
            if which == "multi":
                assert answers == [np.flatnonzero(row).tolist() for row in ours.answers]
            else:
                assert np.abs(np.asarray(answers) - ours.answers).max() < 1e-3
        # budgetlora reads its own export back with the decisions in its weights
        again = budgetlora.load(export).predict(test_file)
        if which == "multi":
            assert (again.answers == ours.answers).all()
            # the model's own probabilities, not the threshold-shifted ones of the folded layer
            assert np.abs(again.probabilities - ours.probabilities).max() < 1e-3
        else:
            assert np.abs(again.answers - ours.answers).max() < 1e-3


def test_temperature_and_ranks_match_scipy_without_needing_it():
    """Core commands run where SciPy is absent, so calibration and Spearman ranks are numpy; they
    must agree with SciPy's bounded minimiser and rankdata."""
    from scipy.optimize import minimize_scalar
    from scipy.stats import rankdata

    from budgetlora.evaluate.calibration import TEMPERATURE_BOUNDS, _nll, fit_temperature
    from budgetlora.evaluate.task_metrics import _ranks

    rng = np.random.default_rng(3)
    for scale in (0.5, 2.0, 6.0):
        labels = rng.integers(0, 4, 400)
        logits = rng.normal(size=(400, 4)) * scale
        logits[np.arange(400), labels] += 2.0
        reference = minimize_scalar(
            lambda log_t, z=logits, y=labels: _nll(z, y, math.exp(log_t)),
            bounds=tuple(math.log(b) for b in TEMPERATURE_BOUNDS),
            method="bounded",
            options={"xatol": 1e-8},
        )
        assert fit_temperature(logits, labels) == pytest.approx(math.exp(reference.x), rel=1e-4)
    ties = rng.integers(0, 5, (60, 3)).astype(float)
    assert np.array_equal(_ranks(ties), rankdata(ties, axis=0))
    assert np.array_equal(_ranks(ties[:, 0]), rankdata(ties[:, 0]))


def test_a_regression_run_extends_from_its_checkpoint(regression_run, tmp_path):
    """The checkpoint's data fingerprint is of the targets as read: the standardised copy the loss
    sees must not make every resume look like changed data."""
    import shutil

    from budgetlora.resuming import resume_run

    run = Path(shutil.copytree(regression_run.path, tmp_path / "reg"))
    resume_run(run, extend=True, overrides=["train.max_steps=84"], verbose=False)
    summary = budgetlora.load(run).summary
    assert summary.steps == 84 and summary.test.scores["spearman"].value is not None


def test_the_paired_bootstrap_calls_identical_answers_a_tie_and_a_clear_gap_a_difference():
    from budgetlora.evaluate.task_metrics import paired_bootstrap_pvalue

    rng = np.random.default_rng(5)
    truth = rng.random((300, 4)) < 0.3
    good = truth.copy()
    good[:20] = ~good[:20]
    assert paired_bootstrap_pvalue(truth, good, good.copy(), "multi_label", resamples=200) == 1.0
    one_off = good.copy()
    one_off[25, 0] = ~one_off[25, 0]  # one label of one row: no evidence either way
    assert paired_bootstrap_pvalue(truth, good, one_off, "multi_label", resamples=200) > 0.5
    poor = rng.random((300, 4)) < 0.3
    assert paired_bootstrap_pvalue(truth, good, poor, "multi_label", resamples=200) < 0.05
    target = rng.normal(size=300)
    assert paired_bootstrap_pvalue(target, target + 0.1, target + 0.1, "regression", resamples=200) == 1.0


@pytest.mark.slow
def test_a_regression_sweep_over_seeds_chooses_and_reports_on_spearman(tiny_bert_dir, task_data, tmp_path):
    """A sweep of another task goes through every step a single-label one does: trial records,
    seed means, ties by a paired bootstrap over (seed, row) pairs, the verdict in its own words."""
    import yaml

    from budgetlora.progress import QUIET
    from budgetlora.sweeps.run import SweepRequest, run_sweep

    base = task_config(
        tiny_bert_dir,
        task_data["reg_train"],
        task_data["reg_test"],
        name="reg",
        task="regression",
        data={"label_column": "score", "val_size": 60},
        train={"max_steps": 12, "eval_every": 12},
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"lora.r": [1, 2]}, "seeds": [1, 2]}))
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDGETLORA_CACHE", str(tmp_path / "cache"))
        outcome = run_sweep(SweepRequest(study=study, out=out, heartbeat=None, console=QUIET))
    assert (outcome.stats.trained, outcome.stats.failed) == (4, 0)
    verdict = (out / "verdict.md").read_text()
    assert "validation Spearman" in verdict and "test Spearman" in verdict and "paired bootstrap" in verdict
    results = (out / "results.md").read_text()
    assert "mean of" in results
    assert "test Spearman x100 (95% CI / ± sd)" in results and "McNemar" not in results
    assert "highest validation Spearman" in results and "bootstrap interval" in results
    assert "chosen on validation" in results and "validation Spearman " in results


def test_results_and_comparisons_name_the_task_objective_and_its_own_interval(multi_run, regression_run, tmp_path):
    """A multi-label or regression table says macro-F1 / Spearman, not accuracy, and no McNemar."""
    from budgetlora.results import build_table, collect_runs, compare_runs
    from budgetlora.results.table import results_markdown
    from budgetlora.results.wording import selection_note

    for run, word, heading in ((multi_run, "macro-F1", "macro-F1 %"), (regression_run, "Spearman", "Spearman x100")):
        root = tmp_path / word
        for name in ("a", "b"):
            shutil.copytree(run.path, root / name)
        table = build_table(collect_runs(root))
        assert set(table["task"]) == {run.summary.task}
        text = results_markdown(table, root)
        assert f"test {heading} (95% CI / ± sd)" in text and f"highest validation {word}" in text
        assert "McNemar" not in text and "Wilson" not in text and "acc %" not in text
        note = selection_note(table)
        assert f"validation {word} " in note
        interval = run.summary.val.objective
        assert interval.high > interval.low  # a bootstrap interval of the tiny model's noisy answers
        # two copies of one run: no spread, so the warning quotes the objective's own interval, in its units
        assert f"95% interval ±{(interval.high - interval.low) / 2:.4f}) is too small" in note
        compared = compare_runs([root / "a", root / "b"], tmp_path / f"compare-{word}")
        assert f"test {heading} (95% CI)" in (tmp_path / f"compare-{word}" / "compare.md").read_text()
        assert list(compared["task"]) == [run.summary.task] * 2


def test_reports_plot_what_fits_each_task(multi_run, regression_run, pair_run, tmp_path):
    """Calibration before/after the temperature (single-label), per-label F1 (multi-label),
    predicted vs true (regression); the summary keeps the reliability bins the plot reads."""
    import shutil

    from budgetlora.results.report import write_report

    expected = {"multi": "per_label_f1.png", "reg": "predicted_vs_true.png", "pair": "reliability.png"}
    for name, run in (("multi", multi_run), ("reg", regression_run), ("pair", pair_run)):
        copy = Path(shutil.copytree(run.path, tmp_path / name))
        write_report(copy)
        assert (copy / expected[name]).stat().st_size > 1000, name
        assert (copy / "confusion_matrix.png").is_file() == (name == "pair"), name
    calibration = budgetlora.load(pair_run.path).summary.test.calibration
    bins = calibration.bins_after
    assert sum(bins.count) == budgetlora.load(pair_run.path).summary.test.n
    assert len(bins.count) == len(bins.confidence) == len(bins.accuracy) == 15
